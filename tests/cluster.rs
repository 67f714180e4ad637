//! Clusters of real `psync-server` processes on loopback: halves of a pair
//! sent to different members match, and each reply comes from the address
//! its client sent to; a sprayed load; replay through a forwarder; a killed
//! member's pairs re-homed; forged, stale and replayed forwards refused and
//! counted; membership from a real DNS server (dnsmasq); SIGTERM drain;
//! the one-line errors of bad cluster flags.
//!
//! Each test uses its own block of 127.0.0.0/8 so they can run at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use psync::cluster::owner::owner_of;
use psync::cluster::ClusterKey;
use psync::wire::cluster::{Body, Header, Kind, Message, MAX_LEN};
use psync::wire::{PeerId, Reply, Request};

const SERVER: &str = env!("CARGO_BIN_EXE_psync-server");
const CLIENT_PORT: u16 = 7000;
const CLUSTER_PORT: u16 = 7001;
/// The addresses of test `n`'s members: `127.A.n.x`, where `A` comes from
/// the process ID, so that two test runs on one machine (several agents, or
/// a developer and CI) do not fight over the same addresses and ports.
fn block(n: u8) -> String {
    format!("127.{}.{n}", 20 + std::process::id() % 200)
}

/// The IPs `block(n).2`, `.3` and `.4`.
fn three(n: u8) -> [String; 3] {
    [2, 3, 4].map(|x| format!("{}.{x}", block(n)))
}

const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A scratch directory, deleted on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("psync-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A file only its owner may read (as key files must be).
    fn file(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One member: a psync-server process.
struct Member {
    child: Child,
    client: SocketAddr,
    cluster: SocketAddr,
    metrics: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// How members learn each other.
enum Members<'a> {
    Static(&'a [&'a str]),
    /// Through DNS: (name:port, the resolv.conf to bind over /etc/resolv.conf).
    Dns(&'a str, &'a Path),
}

fn start(ip: &str, members: &Members, key: &Path, extra: &[&str]) -> Member {
    let mut args: Vec<String> = vec![
        "-v".into(),
        "-4".into(),
        "--bind".into(),
        ip.into(),
        "-p".into(),
        CLIENT_PORT.to_string(),
        "--rate-limit".into(),
        "0".into(),
        "--max-pending-per-ip".into(),
        "0".into(),
        "--max-pending-per-v4-24".into(),
        "0".into(),
        "--max-pending-per-v6-56".into(),
        "0".into(),
        "--max-pending-per-v6-48".into(),
        "0".into(),
        "--stats-interval".into(),
        "0".into(),
        "--metrics".into(),
        format!("{ip}:0"),
        "--cluster-bind".into(),
        format!("{ip}:{CLUSTER_PORT}"),
        "--cluster-key-file".into(),
        key.display().to_string(),
    ];
    let mut cmd = match members {
        Members::Static(list) => {
            args.push("--cluster-peer".into());
            args.push(list.join(","));
            Command::new(SERVER)
        }
        Members::Dns(name, resolv) => {
            args.push("--cluster-dns".into());
            args.push(name.to_string());
            // A mount namespace of its own, where /etc/resolv.conf names the
            // test's DNS server; the host's resolver is untouched.
            let mut c = Command::new("unshare");
            c.arg("-m").arg("sh").arg("-c").arg(format!(
                "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
                resolv.display()
            ));
            c.arg(SERVER);
            c
        }
    };
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = cmd
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psync-server starts");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let lines = stderr.clone();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let found = stderr.lock().unwrap().iter().find_map(|l| {
            l.strip_prefix("psync-server: metrics on http://")
                .and_then(|r| r.split('/').next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
        });
        if let Some(m) = found {
            break m;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{ip}: exited {status}: {:?}", stderr.lock().unwrap());
        }
        assert!(Instant::now() < deadline, "{ip} did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    Member {
        child,
        client: format!("{ip}:{CLIENT_PORT}").parse().unwrap(),
        cluster: format!("{ip}:{CLUSTER_PORT}").parse().unwrap(),
        metrics,
        stderr,
    }
}

impl Member {
    fn signal(&self, sig: i32) {
        // kill(1): the test crate has no unsafe, and libc is not its dependency.
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGTERM, then waits for the exit; returns whether it exited 0.
    fn stop(mut self) -> bool {
        self.signal(15);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics(), name)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for line in self.stderr.lock().unwrap().iter() {
                eprintln!("{}: {line}", self.cluster);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `name` (with its labels, if any) in a metrics page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

fn key_file(scratch: &Scratch) -> PathBuf {
    scratch.file("cluster.key", &format!("{KEY_HEX}\n"))
}

fn client_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    s
}

fn request(a: u32, b: u32) -> [u8; 8] {
    Request {
        self_id: PeerId::from_u32(a),
        peer_id: PeerId::from_u32(b),
    }
    .emit()
}

/// One side of a pair in flight: its socket, request, and the member it
/// sends to.
struct Side {
    socket: UdpSocket,
    request: Vec<u8>,
    to: SocketAddr,
    reply: Option<(SocketAddr, Vec<u8>)>,
}

impl Side {
    fn new(request: impl AsRef<[u8]>, to: SocketAddr) -> Side {
        Side {
            socket: client_socket(),
            request: request.as_ref().to_vec(),
            to,
            reply: None,
        }
    }

    fn send(&self) {
        self.socket.send_to(&self.request, self.to).unwrap();
    }

    fn poll(&mut self) {
        if self.reply.is_some() {
            return;
        }
        let mut buf = [0u8; 512];
        if let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            self.reply = Some((from, buf[..n].to_vec()));
        }
    }
}

/// Runs pairs until every side has a reply, retransmitting every 250 ms,
/// at most `tries` times.
fn complete(sides: &mut [Side], tries: usize) {
    for s in sides.iter() {
        s.send();
    }
    for _ in 0..tries {
        for s in sides.iter_mut() {
            s.poll();
        }
        if sides.iter().all(|s| s.reply.is_some()) {
            return;
        }
        for s in sides.iter().filter(|s| s.reply.is_none()) {
            s.send();
        }
    }
}

/// Checks a completed pair: each reply came from the member its side sent
/// to, names the partner's address, and the ports mirror.
fn check_pair(a: &Side, b: &Side) {
    let (fa, ra) = a.reply.as_ref().expect("a reply to side a");
    let (fb, rb) = b.reply.as_ref().expect("a reply to side b");
    assert_eq!(
        *fa, a.to,
        "the reply comes from the address the client sent to"
    );
    assert_eq!(
        *fb, b.to,
        "the reply comes from the address the client sent to"
    );
    let (ra, rb) = (Reply::parse(ra).unwrap(), Reply::parse(rb).unwrap());
    assert_eq!(ra.peer, b.socket.local_addr().unwrap());
    assert_eq!(rb.peer, a.socket.local_addr().unwrap());
    assert_eq!((ra.src_port, ra.dst_port), (rb.dst_port, rb.src_port));
}

struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn halves_on_different_members_match_and_replies_come_back_the_way_they_came() {
    let scratch = Scratch::new("spray");
    let key = key_file(&scratch);
    let ips = three(10);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let members: Vec<Member> = ips
        .iter()
        .map(|ip| start(ip, &Members::Static(&ips), &key, &[]))
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();

    // One pair whose halves go to two members, neither of them the owner.
    let req = (1u32..)
        .map(|i| request(i, i + 500_000))
        .find(|r| owner_of(r, &addrs) == Some(addrs[2]))
        .unwrap();
    let counter = {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&req[4..]);
        c[4..].copy_from_slice(&req[..4]);
        c
    };
    let mut sides = [Side::new(req, addrs[0]), Side::new(counter, addrs[1])];
    complete(&mut sides, 20);
    check_pair(&sides[0], &sides[1]);
    // Its reply was lost: the retransmit through the forwarder gets the same.
    let first = sides[0].reply.take().unwrap();
    complete(&mut sides[..1], 20);
    assert_eq!(sides[0].reply.as_ref(), Some(&first));
    assert_eq!(members[2].metric("psync_replayed_total"), 1.0);

    // Thousands of pairs, halves sprayed over the three members.
    let mut rng = Lcg(11);
    let pairs = 3000u32;
    for chunk in 0..pairs / 250 {
        let mut sides: Vec<Side> = Vec::new();
        for p in 0..250 {
            let id = 1_000_000 + 2 * (chunk * 250 + p);
            sides.push(Side::new(request(id, id + 1), addrs[rng.below(3)]));
            sides.push(Side::new(request(id + 1, id), addrs[rng.below(3)]));
        }
        complete(&mut sides, 20);
        for pair in sides.chunks(2) {
            check_pair(&pair[0], &pair[1]);
        }
    }
    let pages: Vec<String> = members.iter().map(Member::metrics).collect();
    let sum = |name: &str| pages.iter().map(|p| metric(p, name)).sum::<f64>();
    assert_eq!(sum("psync_matched_total"), f64::from(pairs + 1));
    assert!(
        sum("psync_forwarded_out_total") > f64::from(pairs),
        "most halves travel"
    );
    assert_eq!(
        sum("psync_forwarded_out_total"),
        sum("psync_forwarded_in_total")
    );
    assert_eq!(sum("psync_forward_rejected_total"), 0.0);
    for p in &pages {
        assert_eq!(metric(p, "psync_cluster_members_live"), 3.0);
    }
    for m in members {
        assert!(m.stop());
    }
}

#[test]
fn a_killed_members_pairs_complete_at_the_new_owner() {
    let scratch = Scratch::new("kill");
    let key = key_file(&scratch);
    let ips = three(11);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let mut members: Vec<Member> = ips
        .iter()
        .map(|ip| {
            start(
                ip,
                &Members::Static(&ips),
                &key,
                &["--cluster-timeout", "1s"],
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();
    let owned_by = |i: usize, skip: u32, n: usize| -> Vec<[u8; 8]> {
        (skip..)
            .map(|k| request(k, k + 700_000))
            .filter(|r| owner_of(r, &addrs) == Some(addrs[i]))
            .take(n)
            .collect()
    };
    // Ten pairs owned by member 2 (to be killed), ten owned by member 0.
    let doomed = owned_by(2, 1, 10);
    let safe = owned_by(0, 100_000, 10);
    let swap = |r: &[u8; 8]| {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&r[4..]);
        c[4..].copy_from_slice(&r[..4]);
        c
    };
    // First halves go to member 1 and wait at their owners.
    let mut firsts: Vec<Side> = doomed
        .iter()
        .chain(&safe)
        .map(|r| Side::new(*r, addrs[1]))
        .collect();
    for s in &firsts {
        s.send();
    }
    std::thread::sleep(Duration::from_millis(200));
    let killed = members.remove(2);
    drop(killed); // SIGKILL: no goodbye.

    // The pairs owned by member 0 are not disturbed: their second halves
    // (sent to member 1, forwarded to 0) match at once.
    let mut seconds: Vec<Side> = safe.iter().map(|r| Side::new(swap(r), addrs[1])).collect();
    for s in &seconds {
        s.send();
    }
    for s in seconds.iter_mut() {
        s.poll();
    }
    for (i, s) in seconds.iter().enumerate() {
        assert!(s.reply.is_some(), "safe pair {i} matched on its first send");
    }
    for (a, b) in firsts[10..].iter_mut().zip(&seconds) {
        a.poll();
        check_pair(a, b);
    }
    // The doomed pairs: their second halves go to member 0; both sides
    // retransmit every 250 ms; once member 2 has been silent for the 1 s
    // timeout, the new owners match them.
    let mut sides: Vec<Side> = Vec::new();
    for (a, r) in firsts.drain(..10).zip(&doomed) {
        sides.push(a);
        sides.push(Side::new(swap(r), addrs[0]));
    }
    complete(&mut sides, 40);
    for pair in sides.chunks(2) {
        check_pair(&pair[0], &pair[1]);
    }
    let page = members[0].metrics();
    assert_eq!(metric(&page, "psync_cluster_members_live"), 2.0);
    assert_eq!(
        metric(
            &page,
            &format!("psync_cluster_member_live{{member=\"{}:7001\"}}", ips[2])
        ),
        0.0
    );
}

/// A forward sealed by hand, as member `sender` (incarnation `inc`).
fn forge(
    key: &ClusterKey,
    sender: SocketAddr,
    inc: u64,
    seq: u64,
    sent: u64,
    client: SocketAddr,
    request: &[u8],
) -> Vec<u8> {
    let msg = Message {
        header: Header {
            kind: Kind::Forward,
            lane: 9,
            sender,
            incarnation: inc,
            seq,
            sent_ms: sent,
        },
        body: Body::Forward { client, request },
    };
    let mut buf = [0u8; MAX_LEN];
    let n = msg.emit(&mut buf).unwrap();
    key.seal(&mut buf[..n]);
    buf[..n].to_vec()
}

#[test]
fn forged_stale_and_replayed_forwards_have_no_effect_and_are_counted() {
    let scratch = Scratch::new("forge");
    let key = key_file(&scratch);
    // Member .4 is listed but never runs: the test speaks in its name.
    let ips = three(12);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let members: Vec<Member> = ips[..2]
        .iter()
        .map(|ip| start(ip, &Members::Static(&ips), &key, &[]))
        .collect();
    let target = members[0].cluster;
    let good_key = ClusterKey::parse(KEY_HEX).unwrap();
    let bad_key = ClusterKey::new(&[&[7u8; 32]]).unwrap();
    let ghost: SocketAddr = format!("{}:7001", ips[2]).parse().unwrap();
    let stranger: SocketAddr = format!("{}.9:7001", block(12)).parse().unwrap();
    let victim = client_socket();
    let client = victim.local_addr().unwrap();
    let req = request(4242, 4243);
    let now = unix_ms();
    let inc = now;
    let mut unsigned = forge(&good_key, ghost, inc, 1, now, client, &req);
    let n = unsigned.len();
    unsigned[n - 16..].fill(0);
    let cases = [
        ("bad_mac", unsigned),
        ("bad_mac", forge(&bad_key, ghost, inc, 2, now, client, &req)),
        (
            "stale",
            forge(
                &good_key,
                ghost,
                inc - 120_000,
                3,
                now - 60_000,
                client,
                &req,
            ),
        ),
        (
            "unknown_sender",
            forge(&good_key, stranger, inc, 4, now, client, &req),
        ),
        ("malformed", vec![0x50; 100]),
    ];
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (_, d) in &cases {
        sender.send_to(d, target).unwrap();
    }
    // One good forward, then the very same bytes again.
    let good = forge(&good_key, ghost, inc, 5, unix_ms(), client, &req);
    sender.send_to(&good, target).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sender.send_to(&good, target).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let page = loop {
        let page = members[0].metrics();
        if metric(&page, "psync_forward_rejected_total") >= 6.0 || Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let reason = |r: &str| {
        metric(
            &page,
            &format!("psync_cluster_rejected_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("bad_mac"), 2.0);
    assert_eq!(reason("stale"), 1.0);
    assert_eq!(reason("unknown_sender"), 1.0);
    assert_eq!(reason("malformed"), 1.0);
    assert_eq!(reason("replayed"), 1.0);
    assert_eq!(metric(&page, "psync_forward_rejected_total"), 6.0);
    // Only the good one reached the engine: one registration, nothing sent.
    assert_eq!(metric(&page, "psync_forwarded_in_total"), 1.0);
    assert_eq!(metric(&page, "psync_registered_total"), 1.0);
    let mut buf = [0u8; 64];
    victim
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "nothing was sent to the client"
    );
    for m in members {
        assert!(m.stop());
    }
}

#[test]
fn sigterm_announces_the_departure_and_the_others_rehome_at_once() {
    let scratch = Scratch::new("drain");
    let key = key_file(&scratch);
    let ips = three(14);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    // A long timeout: only the announcement can explain a quick re-homing.
    let mut members: Vec<Member> = ips
        .iter()
        .map(|ip| {
            start(
                ip,
                &Members::Static(&ips),
                &key,
                &["--cluster-timeout", "30s", "--cluster-drain", "1s"],
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();
    let leaving = members.remove(2);
    let started = Instant::now();
    leaving.signal(15);
    let live = |m: &Member| metric(&m.metrics(), "psync_cluster_members_live");
    while live(&members[0]) != 2.0 || live(&members[1]) != 2.0 {
        assert!(started.elapsed() < Duration::from_secs(10), "not re-homed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // While it drains, a pair it owned completes through it: it forwards.
    let req = (1u32..)
        .map(|i| request(i, i + 900_000))
        .find(|r| owner_of(r, &addrs) == Some(addrs[2]))
        .unwrap();
    let mut c = [0u8; 8];
    c[..4].copy_from_slice(&req[4..]);
    c[4..].copy_from_slice(&req[..4]);
    let mut sides = [Side::new(req, addrs[2]), Side::new(c, addrs[0])];
    complete(&mut sides, 3);
    check_pair(&sides[0], &sides[1]);
    assert!(leaving.stop(), "exits 0 after the drain");
    for m in members {
        assert!(m.stop());
    }
}

/// Runs the server with `args` and returns (exit code, stderr lines).
fn run_failing(args: &[&str]) -> (Option<i32>, Vec<String>) {
    let out = Command::new(SERVER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.code(), lines)
}

#[test]
fn bad_cluster_settings_get_one_line_naming_the_flag() {
    let scratch = Scratch::new("flags");
    let short = scratch.file("short.key", "00112233445566778899aabbccddee\n");
    let good = key_file(&scratch);
    let missing = scratch.0.join("missing.key");
    let [b2, b3, b4, b5] = [2, 3, 4, 5].map(|x| format!("{}.{x}", block(15)));
    let base = |key: &Path, peers: &str| -> Vec<String> {
        [
            "-4",
            "--bind",
            &b2,
            "-p",
            "0",
            "--cluster-bind",
            &format!("{}:7001", b2),
            "--cluster-key-file",
            &key.display().to_string(),
            "--cluster-peer",
            peers,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let cases: [(Vec<String>, &str); 5] = [
        (base(&short, &format!("{b2},{b3}")), "--cluster-key-file"),
        (base(&missing, &format!("{b2},{b3}")), "--cluster-key-file"),
        (base(&good, &format!("{b3},{b4},{b5}")), "--cluster-peer"),
        (
            vec![
                "--cluster-peer".into(),
                b2.clone(),
                "--cluster-key-file".into(),
                good.display().to_string(),
            ],
            "--cluster-bind",
        ),
        (
            vec![
                "--cluster-peer".into(),
                b2.clone(),
                "--cluster-bind".into(),
                b2.clone(),
            ],
            "--cluster-key-file",
        ),
    ];
    for (args, flag) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, lines) = run_failing(&args);
        assert_eq!(code, Some(2), "{args:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        assert!(lines[0].starts_with("psync-server: error: "), "{lines:?}");
        assert!(lines[0].contains(flag), "{flag} named: {lines:?}");
    }
    let (_, lines) = run_failing(
        &base(&short, &b2)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        lines[0].contains("15 bytes; it must be 16 to 64 bytes"),
        "{lines:?}"
    );
    let open = scratch.file("open.key", &format!("{KEY_HEX}\n"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (code, lines) = run_failing(
        &base(&open, &b2)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, Some(2));
    assert!(
        lines.len() == 1
            && lines[0].contains("--cluster-key-file")
            && lines[0].contains("chmod 600"),
        "{lines:?}"
    );
    let (_, lines) = run_failing(
        &base(&missing, &b2)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(lines[0].ends_with("no such file"), "{lines:?}");
    let (_, lines) = run_failing(
        &base(&good, &b3)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        lines[0].contains(&format!(
            "do not include this server's --cluster-bind {b2}:7001"
        )),
        "{lines:?}"
    );
}

/// A dnsmasq serving `name` from a hosts file, on `ip`:53.
struct Dnsmasq {
    child: Child,
    hosts: PathBuf,
}

impl Dnsmasq {
    /// Starts serving `ips` as the A records of `name`, and waits until it
    /// answers (a SIGHUP before its handler is installed would kill it).
    fn start(scratch: &Scratch, ip: &str, name: &str, ips: &[&str]) -> Option<Dnsmasq> {
        let text: String = ips.iter().map(|a| format!("{a} {name}\n")).collect();
        let hosts = scratch.file("hosts", &text);
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                &format!("--listen-address={ip}"),
                "--bind-interfaces",
                "--port=53",
                "--no-resolv",
                "--no-hosts",
                &format!("--addn-hosts={}", hosts.display()),
                "--local-ttl=0",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let probe = UdpSocket::bind("127.0.0.1:0").ok()?;
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .ok()?;
        // A query for `name`, type A, class IN.
        let mut query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        loop {
            let _ = probe.send_to(&query, (ip, 53));
            if probe.recv_from(&mut buf).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
        }
        Some(Dnsmasq { child, hosts })
    }

    /// Serves `ips` as the A records of `name` from now on.
    fn set(&self, name: &str, ips: &[&str]) {
        let text: String = ips.iter().map(|ip| format!("{ip} {name}\n")).collect();
        std::fs::write(&self.hosts, text).unwrap();
        let _ = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The DNS test needs dnsmasq and root (a mount namespace per server); CI
/// has both (`.ci/run` installs dnsmasq-base) and must run it.
fn dns_lab_available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let dnsmasq = Command::new("dnsmasq").arg("--version").output().is_ok();
    if root && dnsmasq {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the DNS membership test: it needs root and dnsmasq"
    );
    eprintln!("skipped: the DNS membership test needs root and dnsmasq");
    false
}

#[test]
fn dns_membership_follows_the_records() {
    if !dns_lab_available() {
        return;
    }
    let scratch = Scratch::new("dns");
    let key = key_file(&scratch);
    let dns_ip = format!("{}.1", block(54));
    let dns_ip = dns_ip.as_str();
    let resolv = scratch.file(
        "resolv.conf",
        &format!("nameserver {dns_ip}\noptions timeout:1 attempts:1\n"),
    );
    let name = "members.psync.test";
    let ips = three(13);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let dns = Dnsmasq::start(&scratch, dns_ip, name, &ips).expect("dnsmasq answers");
    let spec = format!("{name}:{CLUSTER_PORT}");
    let members: Vec<Member> = ips
        .iter()
        .map(|ip| {
            start(
                ip,
                &Members::Dns(&spec, &resolv),
                &key,
                &["--cluster-dns-interval", "500ms", "--cluster-timeout", "1s"],
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();
    let live = |m: &Member| metric(&m.metrics(), "psync_cluster_members_live");
    let deadline = Instant::now() + Duration::from_secs(10);
    while members.iter().any(|m| live(m) != 3.0) {
        assert!(Instant::now() < deadline, "the three never saw each other");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spray = |first: u32, to: &[SocketAddr]| {
        let mut rng = Lcg(u64::from(first));
        let mut sides = Vec::new();
        for p in 0..200 {
            let id = first + 2 * p;
            sides.push(Side::new(request(id, id + 1), to[rng.below(to.len())]));
            sides.push(Side::new(request(id + 1, id), to[rng.below(to.len())]));
        }
        complete(&mut sides, 20);
        for pair in sides.chunks(2) {
            check_pair(&pair[0], &pair[1]);
        }
    };
    spray(3_000_000, &addrs);
    assert!(
        members[2].metric("psync_forwarded_in_total") > 0.0,
        "the third member owns some pairs"
    );
    // Its record goes: within the re-resolve interval the others stop
    // forwarding to it (it is still running and would answer).
    dns.set(name, &ips[..2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while live(&members[0]) != 2.0 || live(&members[1]) != 2.0 {
        assert!(Instant::now() < deadline, "the dropped record still counts");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = members[2].metric("psync_forwarded_in_total");
    spray(4_000_000, &addrs[..2]);
    assert_eq!(members[2].metric("psync_forwarded_in_total"), before);
    for m in members {
        assert!(m.stop());
    }
}

/// Runs two psync-clients for the pair (1, 2) with `--server servers` and
/// returns their exit codes and stderr.
fn clients(servers_a: &str, servers_b: &str) -> [(Option<i32>, String); 2] {
    let spawn = |servers: &str, me: &str, peer: &str| {
        Command::new(env!("CARGO_BIN_EXE_psync-client"))
            .args([
                "--server",
                servers,
                "--self",
                me,
                "--peer",
                peer,
                "--timeout",
                "15",
                "--no-port-mapping",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(servers_a, "1", "2");
    let b = spawn(servers_b, "2", "1");
    [a, b].map(|c| {
        let out = c.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}

#[test]
fn clients_that_know_the_members_ask_the_owner_and_fall_back() {
    let scratch = Scratch::new("client");
    let key = key_file(&scratch);
    let ips = three(16);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let mut members: Vec<Member> = ips
        .iter()
        .map(|ip| {
            start(
                ip,
                &Members::Static(&ips),
                &key,
                &["--cluster-timeout", "1s"],
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();
    let list = addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let owner = owner_of(&request(1, 2), &addrs).unwrap();
    let owner_index = addrs.iter().position(|a| *a == owner).unwrap();
    // Both know the members: both ask the owner, nothing is forwarded.
    for (code, err) in clients(&list, &list) {
        assert_eq!(code, Some(0), "{err}");
    }
    let forwarded: f64 = members
        .iter()
        .map(|m| m.metric("psync_forwarded_out_total"))
        .sum();
    assert_eq!(forwarded, 0.0, "clients that know the owner skip the hop");
    assert!(members[owner_index].metric("psync_matched_total") >= 1.0);
    // One knows only a member that does not own the pair: one hop, still works.
    let other = addrs[(owner_index + 1) % 3].to_string();
    for (code, err) in clients(&list, &other) {
        assert_eq!(code, Some(0), "{err}");
    }
    // The owner dies: both fall back to the next member, which owns the
    // pair once the owner has been silent for the timeout.
    let dead = members.remove(owner_index);
    drop(dead);
    for (code, err) in clients(&list, &list) {
        assert_eq!(code, Some(0), "{err}");
    }
}

#[test]
fn v2_halves_on_different_members_match_through_the_owner() {
    use psync::auth::{issue_token, Key};
    use psync::wire::v2;
    use std::os::unix::fs::PermissionsExt;

    let scratch = Scratch::new("v2");
    let key = key_file(&scratch);
    let secret = [0x5bu8; 32];
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let auth = scratch.file("auth.keys", &format!("1 {hex}\n"));
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    let auth_arg = auth.display().to_string();
    let ips = three(17);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let members: Vec<Member> = ips
        .iter()
        .map(|ip| {
            start(
                ip,
                &Members::Static(&ips),
                &key,
                &["--auth-key-file", &auth_arg],
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();
    let signer = Key::new(1, &secret).unwrap();
    let expiry = unix_ms() / 1000 + 60;
    let v2_request = |pair: v2::Pair| {
        v2::Request {
            token: issue_token(&signer, pair, expiry),
            cookie: None,
            info: v2::ClientInfo(0),
            candidates: v2::Candidates::EMPTY,
        }
        .to_bytes()
    };
    // A pair owned by the third member, its halves sent to the other two.
    let pair = (1u64..)
        .map(|i| v2::Pair::new(0x1000_0000_0000 + i, 0x2000_0000_0000 + i))
        .find(|p| owner_of(&v2_request(*p), &addrs) == Some(addrs[2]))
        .unwrap();
    let mut sides = [
        Side::new(v2_request(pair), addrs[0]),
        Side::new(v2_request(pair.counterpart()), addrs[1]),
    ];
    complete(&mut sides, 20);
    for (me, other) in [(0, 1), (1, 0)] {
        let (from, bytes) = sides[me].reply.as_ref().expect("a v2 reply");
        assert_eq!(*from, sides[me].to, "from the member the client sent to");
        let r = v2::Reply::parse(bytes).unwrap();
        assert_eq!(r.peer, sides[other].socket.local_addr().unwrap());
        assert_eq!(r.your_addr, sides[me].socket.local_addr().unwrap());
    }
    assert_eq!(members[2].metric("psync_matched_total"), 1.0);
    assert_eq!(members[2].metric("psync_forwarded_in_total"), 2.0);
    for m in members {
        assert!(m.stop());
    }
}

#[test]
fn members_with_several_workers_hand_forwards_to_the_pairs_worker() {
    let scratch = Scratch::new("workers");
    let key = key_file(&scratch);
    let ips = three(18);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let members: Vec<Member> = ips
        .iter()
        .map(|ip| start(ip, &Members::Static(&ips), &key, &["--workers", "4"]))
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.client).collect();
    let mut rng = Lcg(5);
    for chunk in 0..4u32 {
        let mut sides: Vec<Side> = Vec::new();
        for p in 0..250 {
            let id = 5_000_000 + 2 * (chunk * 250 + p);
            sides.push(Side::new(request(id, id + 1), addrs[rng.below(3)]));
            sides.push(Side::new(request(id + 1, id), addrs[rng.below(3)]));
        }
        complete(&mut sides, 20);
        for pair in sides.chunks(2) {
            check_pair(&pair[0], &pair[1]);
        }
    }
    // A retransmit after the match is replayed by the worker that matched
    // it, through the member the client sent to.
    let req = (1u32..)
        .map(|i| request(i, i + 600_000))
        .find(|r| owner_of(r, &addrs) == Some(addrs[2]))
        .unwrap();
    let mut c = [0u8; 8];
    c[..4].copy_from_slice(&req[4..]);
    c[4..].copy_from_slice(&req[..4]);
    let mut sides = [Side::new(req, addrs[0]), Side::new(c, addrs[1])];
    complete(&mut sides, 20);
    check_pair(&sides[0], &sides[1]);
    let first = sides[0].reply.take().unwrap();
    complete(&mut sides[..1], 20);
    assert_eq!(sides[0].reply.as_ref(), Some(&first));
    let pages: Vec<String> = members.iter().map(Member::metrics).collect();
    let sum = |name: &str| pages.iter().map(|p| metric(p, name)).sum::<f64>();
    assert_eq!(sum("psync_matched_total"), 1001.0);
    assert_eq!(
        sum("psync_forwarded_out_total"),
        sum("psync_forwarded_in_total")
    );
    assert_eq!(sum("psync_forward_rejected_total"), 0.0);
    // Every worker of the owners matched some: the hand-over spreads them.
    for p in &pages {
        for w in 0..4 {
            let line = format!("psync_worker_matched_total{{worker=\"{w}\"}}");
            assert!(metric(p, &line) > 0.0, "worker {w} matched nothing");
        }
    }
    for m in members {
        assert!(m.stop());
    }
}
