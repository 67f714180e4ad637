//! The NAT lab's plumbing: network namespaces joined by veth pairs, three
//! routers, two home-router NATs (nftables masquerade and a stateful forward
//! filter), a server, one client behind each NAT, and processes run inside
//! them with a deadline.
//!
//! ```text
//!  ca  10.1.0.2 ──┐
//!                 swa ── na [nat] 11.0.10.2 ─── ia ──┐
//!  ca2 10.1.0.3 ──┘                                   core ── srv 198.18.0.2
//!  cb  10.2.0.2 ───────── nb [nat] 198.18.21.2 ── ib ──┘
//! ```
//!
//! `swa` is NAT A's LAN switch (a Linux bridge in a namespace of its own,
//! with no nftables: `br_netfilter` would otherwise pass bridged frames
//! through the NAT's forward filter). `ca` and `ca2` share NAT A's public
//! address, for the same-NAT cases; they reach each other over the switch
//! only, since NAT A does not hairpin (a datagram to its own public address
//! from inside is delivered to NAT A itself, where no socket takes it).
//!
//! Between the two NATs lie three routers (`ia`, `core`, `ib`), as on the
//! real internet: a datagram from `ca` with TTL 2, 3 or 4 passes its own NAT
//! (creating the mapping) and dies before it reaches the other NAT, which is
//! what a low-TTL opener relies on. The private networks are not routed on
//! the "internet": `core` knows only the public routes. NAT A's public
//! address is 11.0.10.2, outside the reserved ranges, because miniupnpd (the
//! port-mapping daemon some cases run on NAT A) refuses to serve a router
//! whose WAN address is reserved.
//!
//! Everything is named `psl<pid>-<lab>-<node>`, so parallel tests and parallel
//! runs never collide, and [`Lab`]'s `Drop` removes it (killing whatever still
//! runs inside), also when a test panics. Namespaces left by runs that died
//! (their pid is gone) are removed the first time a lab is built. Traffic
//! never leaves these namespaces: 198.18.0.0/15, 11.0.10.0/24 and 10.0.0.0/8
//! exist only here.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Every namespace of this test binary starts with `psl<pid>-`.
const PREFIX: &str = "psl";

/// The rendezvous server's address on the lab's internet.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// NAT A's public (WAN) address.
pub const NAT_A_PUBLIC: Ipv4Addr = Ipv4Addr::new(11, 0, 10, 2);
/// NAT B's public (WAN) address.
pub const NAT_B_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 21, 2);
/// The client behind NAT A.
pub const CLIENT_A_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
/// The client behind NAT B.
pub const CLIENT_B_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
/// The second client behind NAT A (same LAN as [`CLIENT_A_IP`]).
pub const CLIENT_A2_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);

/// How long an `ip`/`nft` configuration command may take before the lab
/// gives up on it; they normally take milliseconds.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The namespaces of a lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// The client behind NAT A.
    ClientA,
    /// A second client behind NAT A, on the same LAN.
    ClientA2,
    /// NAT A's LAN switch (a bridge).
    SwitchA,
    /// Home router A: masquerade and a stateful forward filter.
    NatA,
    /// A's upstream router.
    IspA,
    /// The backbone router; the server hangs off it.
    Core,
    /// B's upstream router.
    IspB,
    /// Home router B.
    NatB,
    /// The client behind NAT B.
    ClientB,
    /// The rendezvous server.
    Server,
}

impl Node {
    const ALL: [Node; 10] = [
        Node::ClientA,
        Node::ClientA2,
        Node::SwitchA,
        Node::NatA,
        Node::IspA,
        Node::Core,
        Node::IspB,
        Node::NatB,
        Node::ClientB,
        Node::Server,
    ];

    fn short(self) -> &'static str {
        match self {
            Node::ClientA => "ca",
            Node::ClientA2 => "ca2",
            Node::SwitchA => "swa",
            Node::NatA => "na",
            Node::IspA => "ia",
            Node::Core => "core",
            Node::IspB => "ib",
            Node::NatB => "nb",
            Node::ClientB => "cb",
            Node::Server => "srv",
        }
    }

    fn forwards(self) -> bool {
        matches!(
            self,
            Node::NatA | Node::IspA | Node::Core | Node::IspB | Node::NatB
        )
    }
}

/// One veth pair: (node, interface, address/prefix) at each end (no address:
/// a port of the switch's bridge). Interface names avoid words `ip` parses
/// as keywords (`up`, `a` for `address`).
type Link = (
    Node,
    &'static str,
    &'static str,
    Node,
    &'static str,
    &'static str,
);

#[rustfmt::skip]
const LINKS: [Link; 9] = [
    (Node::ClientA,  "lan",   "10.1.0.2/24",    Node::SwitchA, "p-ca",  ""),
    (Node::ClientA2, "lan",   "10.1.0.3/24",    Node::SwitchA, "p-ca2", ""),
    (Node::NatA,    "lan",    "10.1.0.1/24",    Node::SwitchA, "p-na",  ""),
    (Node::NatA,    "wan",    "11.0.10.2/24",   Node::IspA, "downlink", "11.0.10.1/24"),
    (Node::IspA,    "uplink", "198.18.10.2/24", Node::Core, "to-ia",    "198.18.10.1/24"),
    (Node::ClientB, "lan",    "10.2.0.2/24",    Node::NatB, "lan",      "10.2.0.1/24"),
    (Node::NatB,    "wan",    "198.18.21.2/24", Node::IspB, "downlink", "198.18.21.1/24"),
    (Node::IspB,    "uplink", "198.18.20.2/24", Node::Core, "to-ib",    "198.18.20.1/24"),
    (Node::Server,  "eth0",   "198.18.0.2/24",  Node::Core, "to-srv",   "198.18.0.1/24"),
];

/// Routes as `ip route add` arguments, per node.
const ROUTES: [(Node, &str); 10] = [
    (Node::ClientA, "default via 10.1.0.1"),
    (Node::ClientA2, "default via 10.1.0.1"),
    (Node::NatA, "default via 11.0.10.1"),
    (Node::IspA, "default via 198.18.10.1"),
    (Node::Core, "11.0.10.0/24 via 198.18.10.2"),
    (Node::Core, "198.18.21.0/24 via 198.18.20.2"),
    (Node::IspB, "default via 198.18.20.1"),
    (Node::NatB, "default via 198.18.21.1"),
    (Node::ClientB, "default via 10.2.0.1"),
    (Node::Server, "default via 198.18.0.1"),
];

/// How a home router translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// nft `masquerade`: keeps the source port when it can.
    PortPreserving,
    /// nft `masquerade random`: a new random port per flow (symmetric NAT).
    Random,
}

/// What to build.
#[derive(Clone, Copy, Debug)]
pub struct LabConfig {
    /// NAT A's behaviour.
    pub nat_a: Nat,
    /// NAT B's behaviour.
    pub nat_b: Nat,
    /// Percent of UDP datagrams the core router drops at random (0: none).
    pub core_loss_percent: u8,
    /// Run miniupnpd (UPnP IGD, NAT-PMP and PCP) on NAT A.
    pub upnp_a: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nat_a: Nat::PortPreserving,
            nat_b: Nat::PortPreserving,
            core_loss_percent: 0,
            upnp_a: false,
        }
    }
}

/// Why the lab cannot run here, or `None` if it can. Checked once per run;
/// the first call also removes namespaces left behind by dead runs.
pub fn unavailable(extra_tools: &[&str]) -> Option<String> {
    static BASE: OnceLock<Option<String>> = OnceLock::new();
    if let Some(why) = BASE.get_or_init(base_check) {
        return Some(why.clone());
    }
    for tool in extra_tools {
        if !runs(tool, &["-h"]) {
            let package = match *tool {
                "miniupnpd" => "miniupnpd-nftables",
                _ => "netcat-openbsd",
            };
            return Some(format!(
                "`{tool}` is not installed (apt-get install -y {package})"
            ));
        }
    }
    None
}

fn base_check() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces and nftables)".into());
    }
    if !runs("ip", &["-V"]) {
        return Some("`ip` is not installed (apt-get install -y iproute2)".into());
    }
    if !runs("nft", &["--version"]) {
        return Some("`nft` is not installed (apt-get install -y nftables)".into());
    }
    remove_stale();
    // Root inside a container may still lack CAP_SYS_ADMIN, a writable
    // /proc/sys or the kernel's nftables NAT; find out now, in a throwaway
    // namespace, not halfway through building a lab.
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    let out = run("ip", &["netns", "add", &probe]);
    if !out.ok {
        return Some(format!("`ip netns add` fails here: {}", out.stderr.trim()));
    }
    let forwarding = run(
        "ip",
        &[
            "netns",
            "exec",
            &probe,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ],
    );
    let nat = run_with_input(
        "ip",
        &["netns", "exec", &probe, "nft", "-f", "-"],
        Some(nat_rules(Nat::Random).as_bytes()),
    );
    let _ = run("ip", &["netns", "del", &probe]);
    if !forwarding.ok {
        return Some(format!(
            "cannot enable forwarding in a namespace: {}",
            forwarding.stderr.trim()
        ));
    }
    if !nat.ok {
        return Some(format!(
            "nftables masquerade does not load: {}",
            nat.stderr.trim()
        ));
    }
    None
}

/// Returns `Some(reason)` if the lab must be skipped; panics instead when
/// `PSYNC_NAT_LAB=require`. The skip line goes straight to stderr so that
/// `cargo test` shows it even though it captures test output.
pub fn skip_reason(test: &str, extra_tools: &[&str]) -> Option<String> {
    let mode = std::env::var("PSYNC_NAT_LAB").unwrap_or_default();
    let why = if mode == "off" {
        Some("PSYNC_NAT_LAB=off".to_string())
    } else {
        unavailable(extra_tools)
    };
    let why = why?;
    if mode == "require" {
        panic!("natlab: {test}: PSYNC_NAT_LAB=require but the lab cannot run: {why}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "natlab: skipping {test}: {why} (set PSYNC_NAT_LAB=require to make this an error)"
    );
    Some(why)
}

fn is_root() -> bool {
    // The effective uid is the second field of /proc's Uid line; reading it
    // avoids an unsafe geteuid call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A finished setup command.
pub struct Ran {
    /// Exit status 0.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs a short command to completion (bounded by [`SETUP_TIMEOUT`]).
pub fn run(program: &str, args: &[&str]) -> Ran {
    run_with_input(program, args, None)
}

fn run_with_input(program: &str, args: &[&str], input: Option<&[u8]>) -> Ran {
    let name = format!("{program} {}", args.join(" "));
    let mut p = Proc::spawn(&name, program, args, input, SETUP_TIMEOUT);
    let exit = p.finish();
    Ran {
        ok: exit.status.is_some_and(|s| s.success()),
        stdout: exit.stdout_text(),
        stderr: if exit.timed_out {
            format!("timed out after {SETUP_TIMEOUT:?}")
        } else {
            exit.stderr_text()
        },
    }
}

/// Removes `psl<pid>-*` namespaces whose test process is gone. Namespaces of
/// a run that is still alive (another `cargo test` at the same time) stay.
fn remove_stale() {
    let list = run("ip", &["netns", "list"]);
    for line in list.stdout.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || process_is_natlab(pid) {
            continue;
        }
        kill_namespace_processes(name);
        let _ = run("ip", &["netns", "del", name]);
    }
}

fn process_is_natlab(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("natlab"))
        .unwrap_or(false)
}

/// Kills what still runs in one of our namespaces. Only our own tests start
/// processes there, so these are ours.
fn kill_namespace_processes(ns: &str) {
    let pids = run("ip", &["netns", "pids", ns]);
    for pid in pids.stdout.split_whitespace() {
        if let Ok(pid) = pid.parse::<u32>() {
            signal(pid, Signal::Kill);
        }
    }
}

/// A signal the lab sends.
#[derive(Clone, Copy, Debug)]
pub enum Signal {
    /// SIGTERM: ask a server to shut down.
    Term,
    /// SIGKILL: a process that outlived its lab.
    Kill,
}

/// Sends a signal through `kill(1)` of the shell, which every system has;
/// this keeps the tests free of unsafe code.
pub fn signal(pid: u32, sig: Signal) {
    let name = match sig {
        Signal::Term => "TERM",
        Signal::Kill => "KILL",
    };
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid} 2>/dev/null")])
        .status();
}

/// A built lab. Dropping it kills every process inside and deletes every
/// namespace (the veths go with them).
pub struct Lab {
    /// `psl<pid>-<name>`.
    prefix: String,
    /// Namespaces created so far, so a half-built lab is removed too.
    created: Vec<String>,
    /// Files written for daemons, removed with the lab.
    files: Vec<std::path::PathBuf>,
}

impl Lab {
    /// Builds the topology with `cfg`; `name` must be unique within the run.
    pub fn build(name: &str, cfg: LabConfig) -> Lab {
        let mut lab = Lab {
            prefix: format!("{PREFIX}{}-{name}", std::process::id()),
            created: Vec::new(),
            files: Vec::new(),
        };
        if let Err(e) = lab.try_build(cfg) {
            panic!("natlab: building lab {}: {e}", lab.prefix);
        }
        lab
    }

    /// The namespace name of `node`.
    pub fn ns(&self, node: Node) -> String {
        format!("{}-{}", self.prefix, node.short())
    }

    fn try_build(&mut self, cfg: LabConfig) -> Result<(), String> {
        for node in Node::ALL {
            let ns = self.ns(node);
            check(run("ip", &["netns", "add", &ns]), "ip netns add")?;
            self.created.push(ns);
        }
        for (a, a_if, _, b, b_if, _) in LINKS {
            let (na, nb) = (self.ns(a), self.ns(b));
            check(
                run(
                    "ip",
                    &[
                        "link", "add", "name", a_if, "netns", &na, "type", "veth", "peer", "name",
                        b_if, "netns", &nb,
                    ],
                ),
                "ip link add veth",
            )?;
        }
        for node in Node::ALL {
            // One `ip -batch` per namespace: addresses, links up, routes.
            let mut batch = String::from("link set dev lo up\n");
            if node == Node::SwitchA {
                batch.push_str("link add name sw type bridge\nlink set dev sw up\n");
            }
            for (a, a_if, a_addr, b, b_if, b_addr) in LINKS {
                for (n, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
                    if n == node {
                        if addr.is_empty() {
                            let _ = writeln!(batch, "link set dev {ifname} master sw");
                        } else {
                            let _ = writeln!(batch, "addr add {addr} dev {ifname}");
                        }
                        let _ = writeln!(batch, "link set dev {ifname} up");
                    }
                }
            }
            for (n, route) in ROUTES {
                if n == node {
                    let _ = writeln!(batch, "route add {route}");
                }
            }
            let ns = self.ns(node);
            check(
                run_with_input("ip", &["-n", &ns, "-batch", "-"], Some(batch.as_bytes())),
                &format!("ip -n {ns} -batch"),
            )?;
            if node.forwards() {
                self.exec_ok(
                    node,
                    "sh",
                    &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
                )?;
            }
        }
        self.wait_switch_forwarding()?;
        if cfg.upnp_a {
            self.nft(Node::NatA, &upnp_nat_rules(cfg.nat_a))?;
        } else {
            self.nft(Node::NatA, &nat_rules(cfg.nat_a))?;
        }
        self.nft(Node::NatB, &nat_rules(cfg.nat_b))?;
        if cfg.core_loss_percent > 0 {
            self.nft(Node::Core, &loss_rules(cfg.core_loss_percent))?;
        }
        for node in [
            Node::ClientA,
            Node::ClientA2,
            Node::NatA,
            Node::NatB,
            Node::ClientB,
            Node::Server,
        ] {
            self.nft(node, WATCH_RULES)?;
        }
        Ok(())
    }

    /// Waits until every port of NAT A's switch forwards. The kernel enables a
    /// bridge port from its link-watch work, which runs up to a second after
    /// the carrier comes up; a frame before that is dropped, and the first
    /// ARP request of a client lost that way costs it a second (the ARP
    /// retransmit), which is all of a NAT classification's wait.
    fn wait_switch_forwarding(&self) -> Result<(), String> {
        let ports = LINKS
            .iter()
            .filter(|l| l.3 == Node::SwitchA && l.5.is_empty())
            .count();
        let ns = self.ns(Node::SwitchA);
        let end = Instant::now() + SETUP_TIMEOUT;
        loop {
            let out = run("bridge", &["-n", &ns, "link", "show"]);
            let forwarding = out.stdout.matches("state forwarding").count();
            if forwarding == ports {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "the switch's ports never all forwarded: {}{}",
                    out.stdout, out.stderr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Loads an nft script into `node`.
    pub fn nft(&self, node: Node, script: &str) -> Result<(), String> {
        let ns = self.ns(node);
        check(
            run_with_input(
                "ip",
                &["netns", "exec", &ns, "nft", "-f", "-"],
                Some(script.as_bytes()),
            ),
            &format!("nft -f in {ns}"),
        )
    }

    /// Runs a short command in `node` and returns its output.
    pub fn exec(&self, node: Node, program: &str, args: &[&str]) -> Ran {
        let ns = self.ns(node);
        let mut full = vec!["netns", "exec", &ns, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn exec_ok(&self, node: Node, program: &str, args: &[&str]) -> Result<(), String> {
        check(
            self.exec(node, program, args),
            &format!("{program} in {}", self.ns(node)),
        )
    }

    /// Starts `program` in `node` (via `ip netns exec`, which execs in place,
    /// so the pid is the program's), with `stdin` fed and closed, killed at
    /// `timeout` if still running.
    pub fn spawn(
        &self,
        node: Node,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Proc {
        let ns = self.ns(node);
        let mut full = vec!["netns", "exec", &ns, program];
        full.extend_from_slice(args);
        let name = format!(
            "{} in {}: {}",
            short_program(program),
            node.short(),
            args.join(" ")
        );
        Proc::spawn(&name, "ip", &full, stdin, timeout)
    }

    /// The `(source address, source port, destination port)` of every UDP
    /// datagram that has arrived at `node` (counted before any NAT or filter).
    pub fn seen(&self, node: Node) -> Vec<(Ipv4Addr, u16, u16)> {
        let out = self.exec(node, "nft", &["list", "set", "ip", "psl_watch", "seen"]);
        assert!(out.ok, "nft list set in {}: {}", self.ns(node), out.stderr);
        parse_seen(&out.stdout)
    }

    /// Waits (at most `timeout`) until `node` has seen a datagram matching `want`.
    pub fn wait_seen(
        &self,
        node: Node,
        timeout: Duration,
        mut want: impl FnMut(&(Ipv4Addr, u16, u16)) -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.seen(node).iter().any(&mut want) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts miniupnpd on NAT A (built with `upnp_a`) and waits until it
    /// listens for NAT-PMP/PCP and HTTP. It dies with the lab.
    pub fn start_miniupnpd(&mut self, timeout: Duration) -> Proc {
        let dir = std::env::temp_dir();
        let conf = dir.join(format!("{}-miniupnpd.conf", self.prefix));
        let pid = dir.join(format!("{}-miniupnpd.pid", self.prefix));
        std::fs::write(&conf, MINIUPNPD_CONF).expect("write the miniupnpd config");
        self.files.push(conf.clone());
        self.files.push(pid.clone());
        let (conf, pid) = (conf.display().to_string(), pid.display().to_string());
        // -d: foreground with debug output; -P: a pid file of our own, so
        // that labs running at once do not take each other for a running copy.
        let mut daemon = self.spawn(
            Node::NatA,
            "miniupnpd",
            &["-f", &conf, "-d", "-P", &pid],
            None,
            Duration::from_secs(600),
        );
        for needle in ["Listening for NAT-PMP/PCP", "HTTP listening on port"] {
            assert!(
                daemon.wait_stderr(needle, timeout),
                "miniupnpd did not start: {}",
                daemon.stderr_so_far()
            );
        }
        daemon
    }

    /// Writes `text` to a file of the lab's own (mode 600, removed with the
    /// lab), for a daemon's configuration or a key file.
    pub fn private_file(&mut self, name: &str, text: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("{}-{name}", self.prefix));
        std::fs::write(&path, text).expect("write a lab file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod a lab file");
        self.files.push(path.clone());
        path
    }

    /// Packets the core router's loss rule has dropped.
    pub fn core_dropped(&self) -> u64 {
        let out = self.exec(Node::Core, "nft", &["list", "table", "ip", "psl_loss"]);
        assert!(out.ok, "nft list table psl_loss: {}", out.stderr);
        out.stdout
            .split_once("packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("loss rule has a counter")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        for ns in &self.created {
            kill_namespace_processes(ns);
        }
        for ns in &self.created {
            let out = run("ip", &["netns", "del", ns]);
            if !out.ok {
                let _ = writeln!(
                    std::io::stderr(),
                    "natlab: could not delete namespace {ns}: {}",
                    out.stderr.trim()
                );
            }
        }
    }
}

fn check(ran: Ran, what: &str) -> Result<(), String> {
    if ran.ok {
        Ok(())
    } else {
        Err(format!("{what} failed: {}", ran.stderr.trim()))
    }
}

fn short_program(program: &str) -> &str {
    program.rsplit('/').next().unwrap_or(program)
}

/// A home router: translate what the inside sends out on `wan` (the router's
/// own datagrams keep their ports, so tests can send from it); forward
/// inbound only for flows the inside started (established) and their ICMP
/// errors (related).
fn nat_rules(nat: Nat) -> String {
    let masquerade = match nat {
        Nat::PortPreserving => "masquerade",
        Nat::Random => "masquerade random",
    };
    format!(
        "table ip psl_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.0.0.0/8 oifname \"wan\" {masquerade}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan\" oifname \"wan\" accept
  }}
}}
"
    )
}

/// A home router with a port-mapping daemon: the structure miniupnpd's
/// nftables backend expects (Debian's `nft_init.sh` cannot run: its helper
/// file is missing), the same masquerade and stateful filter as
/// [`nat_rules`], and `ct status dnat` accepted so that mapped inbound flows
/// pass the filter.
fn upnp_nat_rules(nat: Nat) -> String {
    let masquerade = match nat {
        Nat::PortPreserving => "masquerade",
        Nat::Random => "masquerade random",
    };
    format!(
        "table inet filter {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct status dnat accept
    iifname \"lan\" oifname \"wan\" accept
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
    ip saddr 10.0.0.0/8 oifname \"wan\" {masquerade}
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"
    )
}

/// miniupnpd's configuration for NAT A: WAN `wan`, LAN `lan`, every
/// protocol on, any LAN host may map any unprivileged port to itself.
pub const MINIUPNPD_CONF: &str = "ext_ifname=wan
listening_ip=lan
enable_natpmp=yes
enable_upnp=yes
secure_mode=no
system_uptime=yes
uuid=8e1a9d36-7c52-4f7e-9b0e-5ea7e2c0a001
allow 1024-65535 10.0.0.0/8 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
";

/// Random loss of UDP on a router; the counter proves the rule bit.
fn loss_rules(percent: u8) -> String {
    format!(
        "table ip psl_loss {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    meta l4proto udp numgen random mod 100 < {percent} counter drop
  }}
}}
"
    )
}

/// Records every arriving UDP datagram's source and ports, before conntrack
/// (raw priority), so tests can see what really crossed the wire.
const WATCH_RULES: &str = "table ip psl_watch {
  set seen {
    type ipv4_addr . inet_service . inet_service
    flags dynamic
    size 65535
  }
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    meta l4proto udp add @seen { ip saddr . udp sport . udp dport }
  }
}
";

/// Parses `elements = { 198.18.0.2 . 5000 . 40001, ... }` of `nft list set`.
fn parse_seen(listing: &str) -> Vec<(Ipv4Addr, u16, u16)> {
    let Some((_, rest)) = listing.split_once("elements = {") else {
        return Vec::new();
    };
    let body = rest.split('}').next().unwrap_or("");
    body.split(',')
        .filter_map(|elem| {
            let mut parts = elem.split('.').map(str::trim);
            // The address's own dots split it too: a.b.c.d . sport . dport.
            let ip: Vec<&str> = parts.by_ref().take(4).collect();
            let ip: Ipv4Addr = ip.join(".").parse().ok()?;
            let sport = parts.next()?.parse().ok()?;
            let dport = parts.next()?.parse().ok()?;
            Some((ip, sport, dport))
        })
        .collect()
}

/// How a [`Proc`] ended.
#[derive(Debug)]
pub struct Exit {
    /// What ran, for messages.
    pub name: String,
    /// The exit status; `None` if it had to be killed at its deadline.
    pub status: Option<ExitStatus>,
    /// It outlived its deadline and was killed.
    pub timed_out: bool,
    /// Wall time from start to exit (or kill).
    pub elapsed: Duration,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

impl Exit {
    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A child process with a deadline; killed (and reaped) on drop.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program`; `stdin` is written and closed (or stdin is empty).
    pub fn spawn(
        name: &str,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("natlab: cannot start {name}: {e}"));
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            // The inputs are a few bytes, far below the pipe buffer: this
            // never blocks. Dropping the pipe sends EOF.
            let _ = pipe.write_all(bytes);
        }
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain(child.stdout.take().unwrap(), stdout.clone()),
            drain(child.stderr.take().unwrap(), stderr.clone()),
        ];
        let started = Instant::now();
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            readers,
            started,
            deadline: started + timeout,
            exit: None,
        }
    }

    /// The process id (the program's own, since `ip netns exec` execs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What was started, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Polls for exit without blocking.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// stderr so far, as text.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stderr contains `needle`; false if the process exits or
    /// `timeout` passes first.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.stderr_so_far().contains(needle) {
                return true;
            }
            if self.exited().is_some() || Instant::now() >= end {
                // One last look: the line may have come with the exit.
                std::thread::sleep(Duration::from_millis(50));
                return self.stderr_so_far().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for exit, killing the process at its deadline.
    pub fn finish(&mut self) -> Exit {
        let mut timed_out = false;
        while self.exited().is_none() {
            if Instant::now() >= self.deadline {
                timed_out = true;
                let _ = self.child.kill();
                self.exit = self.child.wait().ok();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let elapsed = self.started.elapsed();
        // The pipes close when the process is gone; a grandchild holding
        // them must not hang the test, so wait only briefly for the readers.
        let end = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        Exit {
            name: self.name.clone(),
            status: if timed_out { None } else { self.exit },
            timed_out,
            elapsed,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A public address on the lab's internet, for assertions.
pub fn public(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}
