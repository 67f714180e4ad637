//! The peer side of psync: register with the server, punch the hole, prove the path.
//!
//! [`connect`] does the whole job for one peer and returns a [`Connection`]
//! whose UDP socket is known to work in both directions:
//!
//! 1. **Register.** Send the 8-byte request to the server from a fresh socket and
//!    retransmit it with backoff (250 ms doubling to 2 s) until a reply arrives.
//!    The server stays silent until the partner registers, so "no reply" means
//!    either no server or no partner. A reply of the wrong size or family is an
//!    error ([`ClientError::BadReply`]), never a crash.
//! 2. **Open.** Send one opener per path with a low TTL
//!    ([`DEFAULT_OPENER_TTL`]): it leaves our own NAT, which creates the
//!    mapping, and dies before it reaches the partner's NAT. Then wait
//!    [`OPENER_LEAD`] before punching. This defeats the Linux conntrack race in
//!    which the partner's first packet reaches our NAT before our own first
//!    packet has left it, and our NAT gives our flow a different port.
//! 3. **Punch.** Two paths ([`Strategy`]) are tried together unless one is
//!    picked:
//!    - `seed`, the original psync's: bind the `src_port` the server chose and
//!      send to the partner's public IP at `dst_port`;
//!    - `observed`: keep the registration socket and send to the partner's public
//!      address and port exactly as the server saw them.
//!
//!    On each path one side *leads*: it probes every [`PROBE_INTERVAL`] from
//!    [`OPENER_LEAD`] on. The other side *holds*: it sends only openers until
//!    it hears anything from the partner, then probes every path normally.
//!    The deciding peer (below) leads `observed` and holds `seed`; the other
//!    peer the reverse; with one strategy the deciding peer leads it. Why:
//!    when one side's server reply is lost, that side gets the replay only at
//!    its next registration retransmit, 0.25 to 2 s late. The early side's
//!    probes on the path it leads then reach the late side's NAT before the
//!    late side's opener, which loses that path to the race of step 2. The
//!    path the early side holds stays clean: the late side leads it, and its
//!    probes find the early side's mapping already open. Hearing the partner
//!    proves it has its reply and its openers have left, so probing can no
//!    longer race them. A side that has heard nothing after [`HOLD_LIMIT`]
//!    (at most two thirds of the punch window) probes every path anyway.
//! 4. **Prove.** A probe is answered at once by a reply that echoes its nonce.
//!    A side has completed a path when it has received the partner's probe and
//!    seen its own nonce echoed. The peer with the lower ID (bytewise) decides:
//!    the first path it completes wins, and it tells the partner with a `done`
//!    message, which the partner echoes. Both ends therefore end up on the same
//!    path even when both paths work. Foreign or malformed datagrams are ignored.
//! 5. **Retry.** If no path completes within the punch window, register again
//!    from a *new* socket, up to `attempts` times. A new socket is needed: the
//!    server replays the old reply (same ports, same partner address) to a
//!    retransmit from the same source for its replay lifetime, while a request
//!    from a new source address is a fresh registration that gets fresh ports
//!    once the partner re-registers too.
//!
//! Everything, retries included, fits in `timeout`; the only overrun is the
//! deciding peer's wait for the partner's echo of `done`, at most 500 ms past it.
//!
//! Handshake and session datagrams share one 40-byte header (all numbers
//! little-endian): magic `psHP`, version 1, kind, two reserved bytes, the
//! sender's ID, the receiver's ID, the sender's nonce (random per attempt), the
//! echoed nonce, the sender's microsecond stamp and the echoed stamp. Data
//! datagrams carry their payload after the header.
//!
//! This module does client-side I/O only; it never touches server state and
//! reuses [`crate::wire`] for the rendezvous messages.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use psync::client::{connect, ClientConfig};
//! use psync::PeerId;
//!
//! let mut cfg = ClientConfig::new(
//!     "203.0.113.5:1024".parse().unwrap(),
//!     PeerId::from_u32(1),
//!     PeerId::from_u32(2),
//! );
//! cfg.timeout = Duration::from_secs(15);
//! let conn = connect(&cfg)?;
//! eprintln!("connected via {} to {}", conn.strategy, conn.peer);
//! conn.send(b"hello")?;
//! let mut buf = [0u8; 1500];
//! if let Some(n) = conn.recv(&mut buf, Duration::from_secs(5))? {
//!     println!("{}", String::from_utf8_lossy(&buf[..n]));
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket as MioSocket;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::wire::{PeerId, Reply, Request};

/// Default opener TTL. A host behind one NAT router needs 2: the router
/// forwards the packet only if its TTL survives the decrement (and only a
/// forwarded packet reaches POSTROUTING, where masquerade creates the mapping),
/// and the next router drops it. A 3 would already reach a partner NAT one
/// router away with TTL 1, where it is delivered locally and creates exactly the
/// inbound conntrack entry the opener exists to avoid. Raise it for double NAT.
pub const DEFAULT_OPENER_TTL: u8 = 2;
/// Default bound on the whole connect: registration, punching and every retry.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of registrations (each with a fresh socket and fresh ports).
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Default time one attempt spends punching before it registers again.
pub const DEFAULT_PUNCH_WINDOW: Duration = Duration::from_secs(3);
/// Time between probes on each path: ICE paces its checks at a similar rate.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Pause between the openers and the first normal probe: it covers the skew
/// between the moments the two peers get their replies (the server sends both
/// at once; only the two one-way delays differ).
pub const OPENER_LEAD: Duration = Duration::from_millis(100);
/// Longest time a side holds a path (sends only openers on it) while it has
/// heard nothing from the partner; see step 3 of the module docs. 2 s is the
/// longest registration backoff, so it covers a partner whose server reply
/// was lost and who gets the replay at its next retransmit. It matters only
/// when the partner reaches us on no path at all; probing normally is then
/// the last resort (for example behind a double NAT the opener cannot open).
pub const HOLD_LIMIT: Duration = Duration::from_secs(2);

/// First registration retransmit delay; doubled after each send.
const REGISTER_BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest registration retransmit delay: the server's pending lifetime is
/// 30 s by default, so a 2 s refresh keeps the registration alive with margin.
const REGISTER_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How long the server's port may refuse (ICMP port unreachable) before the
/// client gives up with [`ClientError::Refused`]: long enough for a server
/// that is restarting (the NAT lab restarts one for 1 s), short next to the
/// default 10 s timeout. While refused, the client retries every
/// [`REGISTER_BACKOFF_START`].
pub const REFUSED_GRACE: Duration = Duration::from_secs(2);
/// How long the deciding peer waits for the echo of its `done`.
const CONFIRM_WAIT: Duration = Duration::from_secs(1);
/// How far the wait for the echo of `done` may run past the timeout.
const CONFIRM_GRACE: Duration = Duration::from_millis(500);
/// Largest datagram sent: 1232 bytes fits any IPv6 path (1280 minimum MTU
/// less 40 for IPv6 and 8 for UDP) with room to spare.
pub const MAX_DATAGRAM: usize = 1232;
/// Largest payload per data datagram.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - HEADER_LEN;
/// Receive buffer: larger than anything valid, so an oversized datagram is
/// seen at its true length instead of silently truncated.
const RECV_BUF: usize = 2048;
/// Resend period of `bye` until it is acknowledged.
const BYE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest single wait in the pipe loop, so a local EOF is noticed promptly.
const PIPE_TICK: Duration = Duration::from_millis(100);

/// A way to reach the partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The original psync's: bind the server-chosen `src_port`, send to the
    /// partner's public IP at `dst_port`.
    Seed,
    /// Keep the registration socket; send to the partner's public address and
    /// port as the server saw them.
    Observed,
}

impl Strategy {
    /// Whether this side probes this path at once (*leads* it) or holds it,
    /// sending only openers until it hears from the partner. With both
    /// strategies each peer leads one path: the deciding peer `observed`, the
    /// other `seed`. With one strategy the deciding peer leads it.
    fn leads(self, both: bool, decider: bool) -> bool {
        if both {
            (self == Strategy::Observed) == decider
        } else {
            decider
        }
    }

    /// The name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Seed => "seed",
            Strategy::Observed => "observed",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`connect`] needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The rendezvous server.
    pub server: SocketAddr,
    /// This peer's ID.
    pub self_id: PeerId,
    /// The partner's ID.
    pub peer_id: PeerId,
    /// One strategy only, or `None` for both at once.
    pub strategy: Option<Strategy>,
    /// Bound on the whole connect.
    pub timeout: Duration,
    /// Registrations to try, each with fresh ports (at least 1).
    pub attempts: u32,
    /// TTL of the opener packets; 0 sends none.
    pub opener_ttl: u8,
    /// Time one attempt punches before registering again.
    pub punch_window: Duration,
}

impl ClientConfig {
    /// A config with the defaults: both strategies, [`DEFAULT_TIMEOUT`],
    /// [`DEFAULT_ATTEMPTS`], [`DEFAULT_OPENER_TTL`], [`DEFAULT_PUNCH_WINDOW`].
    pub fn new(server: SocketAddr, self_id: PeerId, peer_id: PeerId) -> ClientConfig {
        ClientConfig {
            server,
            self_id,
            peer_id,
            strategy: None,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            opener_ttl: DEFAULT_OPENER_TTL,
            punch_window: DEFAULT_PUNCH_WINDOW,
        }
    }

    fn strategies(&self) -> &'static [Strategy] {
        match self.strategy {
            None => &[Strategy::Seed, Strategy::Observed],
            Some(Strategy::Seed) => &[Strategy::Seed],
            Some(Strategy::Observed) => &[Strategy::Observed],
        }
    }
}

/// Why [`connect`] or [`Connection::pipe`] failed. [`ClientError::exit_code`]
/// maps each to the CLI's exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (exit 2).
    #[error("{0}")]
    Config(String),
    /// The server never answered (exit 3).
    #[error(
        "no reply from the rendezvous server {server} in {} ms: is it running, and did peer {peer} register with it?{last_error}",
        waited.as_millis()
    )]
    NoReply {
        /// The server asked.
        server: SocketAddr,
        /// The partner that was expected.
        peer: PeerId,
        /// How long the client waited.
        waited: Duration,
        /// The last send error, if any, as ` (last send error: ...)`.
        last_error: String,
    },
    /// Nothing listens at the server's port: every registration for
    /// [`REFUSED_GRACE`] was refused by the kernel there (exit 3).
    #[error(
        "the rendezvous server {server} refused the registration: nothing listens on that UDP port \
         (is psync-server running there, and is the port right?)"
    )]
    Refused {
        /// The server asked.
        server: SocketAddr,
    },
    /// The server (or something at its address) sent a malformed reply (exit 1).
    #[error("bad reply from the rendezvous server {server}: {reason}")]
    BadReply {
        /// Where it came from.
        server: SocketAddr,
        /// What was wrong with it.
        reason: String,
    },
    /// Rendezvous worked but no path could be punched (exit 4).
    #[error("rendezvous worked but no path could be punched after {attempts} attempt(s) (tried: {tried}): {reason}")]
    Punch {
        /// Registrations made.
        attempts: u32,
        /// The strategies tried, comma-separated.
        tried: String,
        /// What was seen and the likely cause.
        reason: String,
    },
    /// The partner stopped answering during a pipe session (exit 1).
    #[error("the peer at {peer} went silent for {} s", silence.as_secs_f64())]
    PeerSilent {
        /// The partner.
        peer: SocketAddr,
        /// How long nothing arrived.
        silence: Duration,
    },
    /// A local I/O error (exit 1).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl ClientError {
    /// The exit status the CLI uses: 2 bad usage, 3 no server reply, 4 no path,
    /// 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Config(_) => 2,
            ClientError::NoReply { .. } | ClientError::Refused { .. } => 3,
            ClientError::Punch { .. } => 4,
            ClientError::BadReply { .. }
            | ClientError::PeerSilent { .. }
            | ClientError::Io { .. } => 1,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}

// ---------------------------------------------------------------------------
// Handshake and session datagrams.

/// Header magic: "psync hole punch".
const MAGIC: [u8; 4] = *b"psHP";
const VERSION: u8 = 1;
/// Length of the header every peer-to-peer datagram starts with.
pub const HEADER_LEN: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// "Are you there?": answered at once with `Reply`.
    Probe = 1,
    /// Answer to a probe; echoes its nonce and stamp.
    Reply = 2,
    /// The deciding peer picked this path; the other echoes it.
    Done = 3,
    /// Payload follows the header.
    Data = 4,
    /// Keeps NAT mappings open during a quiet session.
    Keepalive = 5,
    /// The sender has no more data.
    Bye = 6,
    /// `Bye` received.
    ByeAck = 7,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Probe,
            2 => Kind::Reply,
            3 => Kind::Done,
            4 => Kind::Data,
            5 => Kind::Keepalive,
            6 => Kind::Bye,
            7 => Kind::ByeAck,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    kind: Kind,
    from: PeerId,
    to: PeerId,
    nonce: u64,
    echo: u64,
    stamp: u32,
    echo_stamp: u32,
}

impl Header {
    fn emit(&self, buf: &mut [u8]) -> usize {
        let out = &mut buf[..HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind as u8;
        out[6..8].fill(0);
        out[8..12].copy_from_slice(&self.from.0);
        out[12..16].copy_from_slice(&self.to.0);
        out[16..24].copy_from_slice(&self.nonce.to_le_bytes());
        out[24..32].copy_from_slice(&self.echo.to_le_bytes());
        out[32..36].copy_from_slice(&self.stamp.to_le_bytes());
        out[36..40].copy_from_slice(&self.echo_stamp.to_le_bytes());
        HEADER_LEN
    }

    /// Parses a datagram; `None` for anything that is not ours. Only `Data`
    /// may be longer than the header.
    fn parse(datagram: &[u8]) -> Option<(Header, &[u8])> {
        if datagram.len() < HEADER_LEN || datagram[0..4] != MAGIC || datagram[4] != VERSION {
            return None;
        }
        let kind = Kind::from_byte(datagram[5])?;
        if kind != Kind::Data && datagram.len() != HEADER_LEN {
            return None;
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&datagram[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&datagram[i..i + 4]);
            u32::from_le_bytes(b)
        };
        let id_at = |i: usize| {
            PeerId([
                datagram[i],
                datagram[i + 1],
                datagram[i + 2],
                datagram[i + 3],
            ])
        };
        let header = Header {
            kind,
            from: id_at(8),
            to: id_at(12),
            nonce: u64_at(16),
            echo: u64_at(24),
            stamp: u32_at(32),
            echo_stamp: u32_at(36),
        };
        if header.nonce == 0 {
            return None;
        }
        Some((header, &datagram[HEADER_LEN..]))
    }
}

/// What one side needs to build and check headers.
#[derive(Clone, Copy, Debug)]
struct Session {
    self_id: PeerId,
    peer_id: PeerId,
    nonce: u64,
    epoch: Instant,
}

impl Session {
    fn stamp(&self) -> u32 {
        // Microseconds, wrapping every 71 minutes: RTTs are differences.
        self.epoch.elapsed().as_micros() as u32
    }

    fn header(&self, kind: Kind, echo: u64, echo_stamp: u32) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        Header {
            kind,
            from: self.self_id,
            to: self.peer_id,
            nonce: self.nonce,
            echo,
            stamp: self.stamp(),
            echo_stamp,
        }
        .emit(&mut out);
        out
    }

    /// The header of a datagram from the partner to us, or `None`.
    fn accept<'a>(&self, datagram: &'a [u8]) -> Option<(Header, &'a [u8])> {
        let (h, payload) = Header::parse(datagram)?;
        (h.from == self.peer_id && h.to == self.self_id).then_some((h, payload))
    }
}

fn random_nonce() -> Result<u64, ClientError> {
    loop {
        let n = getrandom::u64().map_err(|e| ClientError::Io {
            context: "cannot draw a random nonce".into(),
            source: io::Error::other(e.to_string()),
        })?;
        if n != 0 {
            return Ok(n);
        }
    }
}

// ---------------------------------------------------------------------------
// Connect.

/// A proven path to the partner.
#[derive(Debug)]
pub struct Connection {
    socket: UdpSocket,
    session: Session,
    peer_nonce: u64,
    decider: bool,
    /// The strategy that won.
    pub strategy: Strategy,
    /// Our local address (the socket is connected to the partner).
    pub local: SocketAddr,
    /// The partner address that answered.
    pub peer: SocketAddr,
    /// The partner's public address as the server saw it.
    pub peer_public: SocketAddr,
    /// The source port the server chose for us.
    pub src_port: u16,
    /// The destination port the server chose for us.
    pub dst_port: u16,
    /// Round trip of the first answered probe on the winning path, if measured.
    pub rtt: Option<Duration>,
    /// Time from the start of [`connect`] to the proven path.
    pub elapsed: Duration,
    /// Registrations made (1 unless the first punch failed).
    pub attempts: u32,
}

/// Registers with the server, punches, and returns the first proven path. See
/// the module docs for the steps.
pub fn connect(cfg: &ClientConfig) -> Result<Connection, ClientError> {
    if cfg.self_id == cfg.peer_id {
        return Err(ClientError::Config("--self and --peer must differ".into()));
    }
    if cfg.attempts == 0 {
        return Err(ClientError::Config("--attempts must be at least 1".into()));
    }
    if cfg.timeout.is_zero() {
        return Err(ClientError::Config("--timeout must be above 0".into()));
    }
    if cfg.punch_window.is_zero() {
        return Err(ClientError::Config("--punch-window must be above 0".into()));
    }
    let epoch = Instant::now();
    let deadline = epoch + cfg.timeout;
    let mut reports: Vec<String> = Vec::new();
    let mut likely: Option<Likely> = None;
    let mut tried = Vec::new();
    let mut made = 0;
    for attempt in 1..=cfg.attempts {
        let session = Session {
            self_id: cfg.self_id,
            peer_id: cfg.peer_id,
            nonce: random_nonce()?,
            epoch,
        };
        let mut poll = Poll::new().map_err(io_err("cannot create a poll instance"))?;
        let mut reg =
            bind_udp(cfg.server, 0).map_err(io_err("cannot open the registration socket"))?;
        let reply = match register(&mut poll, &mut reg, cfg, deadline)? {
            Ok(reply) => reply,
            Err(last_error) if attempt == 1 => {
                return Err(ClientError::NoReply {
                    server: cfg.server,
                    peer: cfg.peer_id,
                    waited: epoch.elapsed(),
                    last_error,
                })
            }
            Err(_) => {
                reports.push(format!(
                    "attempt {attempt}: the server did not answer the new registration before the timeout (the peer stopped retrying?)"
                ));
                break;
            }
        };
        made = attempt;
        log::info!(
            "attempt {attempt}: peer {} at {}, src_port {}, dst_port {}",
            cfg.peer_id,
            reply.peer,
            reply.src_port,
            reply.dst_port
        );
        let window_end = (Instant::now() + cfg.punch_window).min(deadline);
        match punch(&mut poll, reg, &reply, cfg, session, window_end, deadline)? {
            Ok(mut conn) => {
                conn.attempts = attempt;
                return Ok(conn);
            }
            Err(report) => {
                for s in &report.tried {
                    if !tried.contains(s) {
                        tried.push(*s);
                    }
                }
                log::info!("attempt {attempt} failed: {}", report.describe());
                likely = likely.max(report.likely);
                reports.push(format!("attempt {attempt}: {}", report.describe()));
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    let tried_names: Vec<&str> = tried.iter().map(|s| s.name()).collect();
    let tried_names = if tried_names.is_empty() {
        cfg.strategies().iter().map(|s| s.name()).collect()
    } else {
        tried_names
    };
    if let Some(l) = likely {
        reports.push(format!("likely cause: {}", l.explain()));
    }
    Err(ClientError::Punch {
        attempts: made,
        tried: tried_names.join(", "),
        reason: reports.join("; "),
    })
}

/// A UDP socket of `like`'s family on the wildcard address at `port`.
fn bind_udp(like: SocketAddr, port: u16) -> io::Result<MioSocket> {
    let (domain, local): (Domain, SocketAddr) = match like {
        SocketAddr::V4(_) => (Domain::IPV4, (Ipv4Addr::UNSPECIFIED, port).into()),
        SocketAddr::V6(_) => (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into()),
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if like.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&SockAddr::from(local))?;
    socket.set_nonblocking(true)?;
    Ok(MioSocket::from_std(socket.into()))
}

/// Waits for readiness or `timeout`, retrying on `EINTR`.
fn wait(poll: &mut Poll, events: &mut Events, timeout: Duration) -> Result<(), ClientError> {
    loop {
        match poll.poll(events, Some(timeout)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("poll failed")(e)),
        }
    }
}

const REG: Token = Token(0);
const SEED: Token = Token(1);

/// Sends the request until the server replies or `deadline` passes. The outer
/// error is fatal; the inner `Err` is "no reply", with the last send error.
/// While registering, the socket reports ICMP errors, so a port where
/// nothing listens fails within [`REFUSED_GRACE`] instead of the timeout.
fn register(
    poll: &mut Poll,
    reg: &mut MioSocket,
    cfg: &ClientConfig,
    deadline: Instant,
) -> Result<Result<Reply, String>, ClientError> {
    let v6 = cfg.server.is_ipv6();
    if let Err(e) = crate::sys::set_recv_errors(reg, v6, true) {
        log::debug!("cannot ask for ICMP errors on the registration socket: {e}");
    }
    let result = register_until_reply(poll, reg, cfg, deadline);
    // Off again before punching: the peer's NAT may answer early probes
    // with ICMP errors, which must not pile up in the socket.
    let _ = crate::sys::set_recv_errors(reg, v6, false);
    result
}

fn register_until_reply(
    poll: &mut Poll,
    reg: &mut MioSocket,
    cfg: &ClientConfig,
    deadline: Instant,
) -> Result<Result<Reply, String>, ClientError> {
    poll.registry()
        .register(reg, REG, Interest::READABLE)
        .map_err(io_err("cannot poll the registration socket"))?;
    // Since when every registration sent was refused, and whether the
    // latest one was: a send that draws no refusal ends the streak.
    let mut refused_since: Option<Instant> = None;
    let mut refused_latest = false;
    let request = Request {
        self_id: cfg.self_id,
        peer_id: cfg.peer_id,
    }
    .emit();
    let mut events = Events::with_capacity(4);
    let mut buf = [0u8; RECV_BUF];
    let mut backoff = REGISTER_BACKOFF_START;
    let mut next_send = Instant::now();
    let mut last_error = String::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(Err(last_error));
        }
        if now >= next_send {
            if !refused_latest {
                refused_since = None;
            }
            refused_latest = false;
            match reg.send_to(&request, cfg.server) {
                Ok(_) => log::debug!("registration sent to {}", cfg.server),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The network may come back before the deadline: keep trying.
                Err(e) => last_error = format!(" (last send error: {e})"),
            }
            next_send = now + backoff;
            backoff = (backoff * 2).min(REGISTER_BACKOFF_CAP);
        }
        wait(poll, &mut events, next_send.min(deadline) - now)?;
        loop {
            match reg.recv_from(&mut buf) {
                Ok((n, from)) if from == cfg.server => {
                    return check_reply(&buf[..n], cfg.server).map(Ok)
                }
                Ok((_, from)) => log::debug!("ignored a datagram from {from} while registering"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let now = Instant::now();
                    let since = *refused_since.get_or_insert(now);
                    if !refused_latest && since == now {
                        log::warn!(
                            "{}: connection refused (nothing listens there?); retrying for {} ms \
                             in case the server is restarting",
                            cfg.server,
                            REFUSED_GRACE.as_millis()
                        );
                    }
                    refused_latest = true;
                    if now.duration_since(since) >= REFUSED_GRACE {
                        return Err(ClientError::Refused { server: cfg.server });
                    }
                    last_error = " (the server's port refused it)".into();
                    next_send = next_send.min(now + REGISTER_BACKOFF_START);
                    backoff = REGISTER_BACKOFF_START;
                }
                // ICMP errors surface here on some systems; the retransmit
                // timer decides what happens next.
                Err(e) => {
                    last_error = format!(" (last receive error: {e})");
                    break;
                }
            }
        }
    }
}

fn check_reply(datagram: &[u8], server: SocketAddr) -> Result<Reply, ClientError> {
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

/// One path being punched.
struct Path {
    strategy: Strategy,
    socket: MioSocket,
    /// Where probes go; moves to the partner's actual source port if it
    /// answers from another one (its NAT changed the port).
    target: SocketAddr,
    expected: SocketAddr,
    /// Sends only openers until the partner is heard (or [`HOLD_LIMIT`]).
    held: bool,
    /// Openers repeated while holding (the first one is not counted).
    held_openers: u32,
    sent: u32,
    heard: u32,
    heard_probe: bool,
    acked: bool,
    rtt: Option<Duration>,
}

/// What a failed attempt saw, for the exit-4 message.
struct AttemptReport {
    tried: Vec<Strategy>,
    notes: Vec<String>,
    likely: Option<Likely>,
}

impl AttemptReport {
    fn describe(&self) -> String {
        self.notes.join("; ")
    }
}

/// The likely cause of a failed punch, from the least to the most telling
/// evidence: the most telling one seen on any path of any attempt is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Likely {
    Silent,
    NoPeerProbe,
    OneWay,
    PeerMoved,
    Unconfirmed,
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

    fn explain(self) -> &'static str {
        match self {
            Likely::Silent => "nothing came back from the peer: likely a NAT that changes ports per destination (symmetric), or a firewall dropping inbound UDP, on either side",
            Likely::NoPeerProbe => "our probes were answered but the peer's own probes never arrived: heavy loss",
            Likely::OneWay => "the peer's packets arrived but ours never reached it: likely our NAT changes ports per destination, or a firewall drops our outbound UDP",
            Likely::PeerMoved => "the peer's packets came from another port than the server saw: its NAT changes ports per destination (symmetric)",
            Likely::Unconfirmed => "both directions worked but the deciding peer never confirmed a path: heavy loss, or it gave up",
        }
    }
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

/// Opens and punches the paths of one attempt. The outer error is fatal.
fn punch(
    poll: &mut Poll,
    reg: MioSocket,
    reply: &Reply,
    cfg: &ClientConfig,
    session: Session,
    window_end: Instant,
    deadline: Instant,
) -> Result<Result<Connection, AttemptReport>, ClientError> {
    let mut report = AttemptReport {
        tried: Vec::new(),
        notes: Vec::new(),
        likely: None,
    };
    let mut paths: Vec<Path> = Vec::with_capacity(2);
    let mut reg = Some(reg);
    let decider = cfg.self_id < cfg.peer_id;
    let both = cfg.strategies().len() > 1;
    for &strategy in cfg.strategies() {
        report.tried.push(strategy);
        let (socket, target) = match strategy {
            Strategy::Observed => (
                reg.take().expect("registration socket used once"),
                reply.peer,
            ),
            Strategy::Seed => match bind_udp(cfg.server, reply.src_port) {
                Ok(mut s) => {
                    poll.registry()
                        .register(&mut s, SEED, Interest::READABLE)
                        .map_err(io_err("cannot poll the seed socket"))?;
                    (s, SocketAddr::new(reply.peer.ip(), reply.dst_port))
                }
                Err(e) => {
                    report.notes.push(format!(
                        "seed could not bind local port {}: {e}",
                        reply.src_port
                    ));
                    continue;
                }
            },
        };
        paths.push(Path {
            strategy,
            socket,
            target,
            expected: target,
            // Holding needs openers: without them the partner's probes could
            // never get in, and the hold would only cost time.
            held: cfg.opener_ttl > 0 && !strategy.leads(both, decider),
            held_openers: 0,
            sent: 0,
            heard: 0,
            heard_probe: false,
            acked: false,
            rtt: None,
        });
    }
    // Only the observed path keeps the registration socket.
    drop(reg.take());
    let path_of = |t: Token, paths: &[Path]| -> Option<usize> {
        let want = if t == REG {
            Strategy::Observed
        } else {
            Strategy::Seed
        };
        paths.iter().position(|p| p.strategy == want)
    };
    if paths.is_empty() {
        return Ok(Err(report));
    }

    if cfg.opener_ttl > 0 {
        let probe = session.header(Kind::Probe, 0, 0);
        for p in &paths {
            send_opener(&p.socket, &probe, p.target, cfg.opener_ttl);
        }
    }
    let punch_start = Instant::now()
        + if cfg.opener_ttl > 0 {
            OPENER_LEAD
        } else {
            Duration::ZERO
        };
    let mut next_probe = punch_start;
    // Past this, a path still held starts probing normally. Capped so that a
    // short punch window still leaves a third of itself for normal probing.
    let mut hold_until = Some(Instant::now() + HOLD_LIMIT.min(cfg.punch_window * 2 / 3))
        .filter(|_| paths.iter().any(|p| p.held));
    let mut peer_nonce = 0u64;
    // The deciding side's winner and when it stops waiting for the echo of done.
    let mut won: Option<(usize, Instant)> = None;
    let mut events = Events::with_capacity(8);
    let mut buf = [0u8; RECV_BUF];

    let finish = |paths: &mut Vec<Path>, i: usize, poll: &mut Poll, peer_nonce: u64| {
        let mut p = paths.swap_remove(i);
        let _ = poll.registry().deregister(&mut p.socket);
        connection(p, reply, session, peer_nonce, decider)
    };

    loop {
        let now = Instant::now();
        let end = match won {
            Some((_, until)) => until,
            None => window_end,
        };
        if now >= end {
            if let Some((i, _)) = won {
                log::info!("no echo of done from the peer; the path is proven, going ahead");
                return finish(&mut paths, i, poll, peer_nonce).map(Ok);
            }
            report.notes.extend(paths.iter().map(path_note));
            report.likely = paths.iter().map(|p| Likely::of(p, decider)).max();
            return Ok(Err(report));
        }
        if hold_until.is_some_and(|t| now >= t) {
            log::info!("nothing heard from the peer while holding; probing every path");
            release(&mut paths);
            hold_until = None;
        }
        if now >= next_probe {
            match won {
                Some((i, _)) => {
                    let done = session.header(Kind::Done, peer_nonce, 0);
                    let _ = paths[i].socket.send_to(&done, paths[i].target);
                }
                None => {
                    let probe = session.header(Kind::Probe, peer_nonce, 0);
                    for p in &mut paths {
                        if p.held {
                            // Keeps (or, if the first was lost, makes) our
                            // mapping without touching the partner's NAT.
                            send_opener(&p.socket, &probe, p.target, cfg.opener_ttl);
                            p.held_openers += 1;
                        } else {
                            p.sent += 1;
                            let _ = p.socket.send_to(&probe, p.target);
                        }
                    }
                }
            }
            next_probe = now + PROBE_INTERVAL;
        }
        let wake = hold_until.map_or(next_probe, |t| t.min(next_probe));
        wait(
            poll,
            &mut events,
            wake.min(end).saturating_duration_since(now),
        )?;
        let mut heard_peer = false;
        for event in events.iter() {
            let Some(i) = path_of(event.token(), &paths) else {
                continue;
            };
            loop {
                let (n, from) = match paths[i].socket.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ICMP port unreachable and the like: the peer is not there yet.
                    Err(_) => continue,
                };
                let Some((h, _)) = session.accept(&buf[..n]) else {
                    continue;
                };
                let p = &mut paths[i];
                if from.ip() != p.target.ip() {
                    continue;
                }
                heard_peer = true;
                if from != p.target {
                    log::info!(
                        "{}: the peer answers from {from}, not {}; following it",
                        p.strategy,
                        p.target
                    );
                    p.target = from;
                }
                peer_nonce = h.nonce;
                match h.kind {
                    Kind::Probe => {
                        p.heard += 1;
                        p.heard_probe = true;
                        let answer = session.header(Kind::Reply, h.nonce, h.stamp);
                        let _ = p.socket.send_to(&answer, p.target);
                    }
                    Kind::Reply if h.echo == session.nonce => {
                        p.heard += 1;
                        p.acked = true;
                        if p.rtt.is_none() {
                            let us = session.stamp().wrapping_sub(h.echo_stamp);
                            p.rtt = Some(Duration::from_micros(u64::from(us)));
                        }
                    }
                    Kind::Done if h.echo == session.nonce => {
                        if decider {
                            if matches!(won, Some((w, _)) if w == i) {
                                return finish(&mut paths, i, poll, peer_nonce).map(Ok);
                            }
                        } else {
                            let done = session.header(Kind::Done, h.nonce, h.stamp);
                            let _ = p.socket.send_to(&done, p.target);
                            return finish(&mut paths, i, poll, peer_nonce).map(Ok);
                        }
                    }
                    // The partner is already in its session on the path we picked:
                    // as good as the echo of done.
                    Kind::Data | Kind::Keepalive | Kind::Bye if decider => {
                        if matches!(won, Some((w, _)) if w == i) {
                            return finish(&mut paths, i, poll, peer_nonce).map(Ok);
                        }
                    }
                    _ => {}
                }
                if decider && won.is_none() && p.heard_probe && p.acked {
                    log::info!("{} proven both ways; telling the peer", p.strategy);
                    let done = session.header(Kind::Done, peer_nonce, 0);
                    let _ = p.socket.send_to(&done, p.target);
                    won = Some((
                        i,
                        (Instant::now() + CONFIRM_WAIT).min(deadline + CONFIRM_GRACE),
                    ));
                    next_probe = Instant::now() + PROBE_INTERVAL;
                    // The losing path stops probing; its socket closes with the attempt.
                }
            }
        }
        // Anything from the partner (a normal-TTL packet: openers die on the
        // way) means it has its reply and its openers have left its NAT, on
        // every path at once: probing normally can no longer race them.
        if heard_peer && hold_until.is_some() {
            log::info!("heard the peer; probing every path");
            release(&mut paths);
            hold_until = None;
            next_probe = Instant::now().min(next_probe);
        }
    }
}

/// Ends the hold: every path probes normally from the next probe round.
fn release(paths: &mut [Path]) {
    for p in paths {
        p.held = false;
    }
}

/// Sends one probe with a low TTL (or hop limit), then restores the default.
fn send_opener(socket: &MioSocket, probe: &[u8], to: SocketAddr, ttl: u8) {
    let sock = SockRef::from(socket);
    let result = if to.is_ipv4() {
        sock.ttl_v4().and_then(|old| {
            sock.set_ttl_v4(u32::from(ttl))?;
            let sent = socket.send_to(probe, to);
            sock.set_ttl_v4(old)?;
            sent
        })
    } else {
        sock.unicast_hops_v6().and_then(|old| {
            sock.set_unicast_hops_v6(u32::from(ttl))?;
            let sent = socket.send_to(probe, to);
            sock.set_unicast_hops_v6(old)?;
            sent
        })
    };
    match result {
        Ok(_) => log::debug!("opener with ttl {ttl} sent to {to}"),
        Err(e) => log::warn!("opener to {to} failed: {e}"),
    }
}

fn connection(
    path: Path,
    reply: &Reply,
    session: Session,
    peer_nonce: u64,
    decider: bool,
) -> Result<Connection, ClientError> {
    let socket: UdpSocket = path.socket.into();
    socket
        .set_nonblocking(false)
        .map_err(io_err("cannot make the socket blocking"))?;
    // Connected: the kernel now filters out everyone but the partner, and the
    // local address shows the real source IP.
    socket.connect(path.target).map_err(io_err(format!(
        "cannot connect the socket to {}",
        path.target
    )))?;
    let local = socket
        .local_addr()
        .map_err(io_err("cannot read the local address"))?;
    Ok(Connection {
        socket,
        session,
        peer_nonce,
        decider,
        strategy: path.strategy,
        local,
        peer: path.target,
        peer_public: reply.peer,
        src_port: reply.src_port,
        dst_port: reply.dst_port,
        rtt: path.rtt,
        elapsed: session.epoch.elapsed(),
        attempts: 1,
    })
}

// ---------------------------------------------------------------------------
// Session.

/// How [`Connection::pipe`] keeps the session alive and decides it is over.
#[derive(Clone, Copy, Debug)]
pub struct PipeConfig {
    /// Keepalive period: Linux conntrack forgets an unanswered UDP flow after
    /// 30 s, and many home routers sooner.
    pub keepalive: Duration,
    /// The session ends when nothing has come from the partner this long.
    pub silence: Duration,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            keepalive: Duration::from_secs(5),
            silence: Duration::from_secs(20),
        }
    }
}

/// Byte counts of a finished pipe session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Payload bytes sent.
    pub sent: u64,
    /// Payload bytes received and written.
    pub received: u64,
}

impl Connection {
    /// The connected socket, for callers that run their own protocol over it.
    /// Datagrams from the partner still carry the psync header.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Sends one payload (at most [`MAX_PAYLOAD`] bytes) to the partner.
    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len()),
            ));
        }
        let mut buf = [0u8; MAX_DATAGRAM];
        buf[..HEADER_LEN].copy_from_slice(&self.session.header(Kind::Data, self.peer_nonce, 0));
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        self.socket
            .send(&buf[..HEADER_LEN + payload.len()])
            .map(|_| ())
    }

    /// Waits up to `timeout` for the next payload from the partner, copies it
    /// to the front of `buf` (truncating) and returns its length; `None` on
    /// timeout. Handshake stragglers are answered, keepalives skipped.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let until = Instant::now() + timeout;
        let mut dgram = [0u8; RECV_BUF];
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(until - now))?;
            let n = match self.socket.recv(&mut dgram) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if let Some((Kind::Data, payload)) = self.handle(&dgram[..n]) {
                let len = payload.len().min(buf.len());
                buf[..len].copy_from_slice(&payload[..len]);
                return Ok(Some(len));
            }
        }
    }

    /// Checks a datagram from the partner and answers handshake stragglers.
    /// Returns its kind and payload if it is valid.
    fn handle<'a>(&self, datagram: &'a [u8]) -> Option<(Kind, &'a [u8])> {
        let (h, payload) = self.session.accept(datagram)?;
        if h.nonce != self.peer_nonce {
            return None;
        }
        match h.kind {
            // The partner is still punching: it has not seen our answer, or,
            // if we decided, not our done (all of them lost); send both.
            Kind::Probe => {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Reply, h.nonce, h.stamp));
                if self.decider {
                    let _ = self
                        .socket
                        .send(&self.session.header(Kind::Done, h.nonce, h.stamp));
                }
            }
            // Our echo of done was lost; only the side that did not decide
            // echoes, so the two never ping-pong.
            Kind::Done if !self.decider => {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Done, h.nonce, h.stamp));
            }
            _ => {}
        }
        Some((h.kind, payload))
    }

    /// Relays `input` to the partner and the partner's payloads to `output`,
    /// netcat-style, with keepalives, until both sides have reached EOF, or
    /// the partner goes silent. Datagram boundaries follow `input`'s reads;
    /// like UDP netcat, a lost datagram is lost.
    ///
    /// `input` is read on its own thread; if the session ends first, that
    /// thread stays blocked in `read` until the input yields or the process ends.
    pub fn pipe<R, W>(
        self,
        mut input: R,
        mut output: W,
        cfg: &PipeConfig,
    ) -> Result<PipeStats, ClientError>
    where
        R: Read + Send + 'static,
        W: Write,
    {
        let sender = self
            .socket
            .try_clone()
            .map_err(io_err("cannot clone the socket"))?;
        let eof = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (reader_eof, reader_sent) = (eof.clone(), sent.clone());
        let session = self.session;
        let peer_nonce = self.peer_nonce;
        std::thread::spawn(move || {
            let mut buf = [0u8; MAX_DATAGRAM];
            loop {
                match input.read(&mut buf[HEADER_LEN..]) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf[..HEADER_LEN].copy_from_slice(&session.header(
                            Kind::Data,
                            peer_nonce,
                            0,
                        ));
                        if sender.send(&buf[..HEADER_LEN + n]).is_ok() {
                            reader_sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("input read failed, treating it as EOF: {e}");
                        break;
                    }
                }
            }
            reader_eof.store(true, Ordering::Release);
            let _ = sender.send(&session.header(Kind::Bye, peer_nonce, 0));
        });

        let mut stats = PipeStats::default();
        let mut dgram = [0u8; RECV_BUF];
        let mut last_heard = Instant::now();
        let mut next_keepalive = Instant::now() + cfg.keepalive;
        let mut next_bye = Instant::now() + BYE_INTERVAL;
        let (mut peer_bye, mut bye_acked) = (false, false);
        loop {
            let now = Instant::now();
            let local_eof = eof.load(Ordering::Acquire);
            if local_eof && bye_acked && peer_bye {
                stats.sent = sent.load(Ordering::Relaxed);
                return Ok(stats);
            }
            if now.duration_since(last_heard) >= cfg.silence {
                stats.sent = sent.load(Ordering::Relaxed);
                // A partner that said bye and then left owes us nothing.
                return if peer_bye {
                    Ok(stats)
                } else {
                    Err(ClientError::PeerSilent {
                        peer: self.peer,
                        silence: cfg.silence,
                    })
                };
            }
            if local_eof && !bye_acked && now >= next_bye {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Bye, self.peer_nonce, 0));
                next_bye = now + BYE_INTERVAL;
            }
            if now >= next_keepalive {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Keepalive, self.peer_nonce, 0));
                next_keepalive = now + cfg.keepalive;
            }
            let wake = next_keepalive
                .min(last_heard + cfg.silence)
                .min(now + PIPE_TICK)
                .max(now + Duration::from_millis(1));
            self.socket
                .set_read_timeout(Some(wake - now))
                .map_err(io_err("cannot set a read timeout"))?;
            let n = match self.socket.recv(&mut dgram) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                // The partner's socket is closed (ICMP port unreachable): the
                // silence timer decides.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(io_err("receive from the peer failed")(e)),
            };
            let Some((kind, payload)) = self.handle(&dgram[..n]) else {
                continue;
            };
            last_heard = Instant::now();
            match kind {
                Kind::Data => {
                    output
                        .write_all(payload)
                        .and_then(|()| output.flush())
                        .map_err(io_err("cannot write the output"))?;
                    stats.received += payload.len() as u64;
                }
                Kind::Bye => {
                    peer_bye = true;
                    let _ =
                        self.socket
                            .send(&self.session.header(Kind::ByeAck, self.peer_nonce, 0));
                }
                Kind::ByeAck => bye_acked = true,
                _ => {}
            }
        }
    }

    /// The connection as one JSON object (the CLI's `--json` line).
    pub fn to_json(&self) -> String {
        let rtt = match self.rtt {
            Some(d) => format!("{:.3}", d.as_secs_f64() * 1000.0),
            None => "null".into(),
        };
        format!(
            "{{\"strategy\":\"{}\",\"local\":\"{}\",\"peer\":\"{}\",\"peer_public\":\"{}\",\"src_port\":{},\"dst_port\":{},\"rtt_ms\":{},\"attempts\":{},\"elapsed_ms\":{}}}",
            self.strategy,
            self.local,
            self.peer,
            self.peer_public,
            self.src_port,
            self.dst_port,
            rtt,
            self.attempts,
            self.elapsed.as_millis()
        )
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE_FIXTURE: [u8; HEADER_LEN] = [
        b'p', b's', b'H', b'P', // magic
        1, 1, 0, 0, // version, kind probe, reserved
        1, 0, 0, 0, // from 1
        2, 0, 0, 0, // to 2
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // nonce
        0, 0, 0, 0, 0, 0, 0, 0, // echo
        0xe8, 0x03, 0, 0, // stamp 1000 µs
        0, 0, 0, 0, // echo stamp
    ];

    fn probe() -> Header {
        Header {
            kind: Kind::Probe,
            from: PeerId::from_u32(1),
            to: PeerId::from_u32(2),
            nonce: 0x1122_3344_5566_7788,
            echo: 0,
            stamp: 1000,
            echo_stamp: 0,
        }
    }

    #[test]
    fn header_matches_fixture() {
        let mut buf = [0u8; HEADER_LEN];
        assert_eq!(probe().emit(&mut buf), HEADER_LEN);
        assert_eq!(buf, PROBE_FIXTURE);
        assert_eq!(Header::parse(&PROBE_FIXTURE), Some((probe(), &[][..])));
    }

    #[test]
    fn header_rejects_foreign_datagrams() {
        assert_eq!(Header::parse(&PROBE_FIXTURE[..39]), None);
        assert_eq!(Header::parse(&[0u8; 20]), None);
        let mut long = [0u8; HEADER_LEN + 1];
        long[..HEADER_LEN].copy_from_slice(&PROBE_FIXTURE);
        assert_eq!(Header::parse(&long), None, "only data may carry a payload");
        long[5] = Kind::Data as u8;
        assert_eq!(Header::parse(&long).map(|(_, p)| p.len()), Some(1));
        for (i, v) in [(0, b'x'), (4, 2), (5, 0), (5, 8), (16, 0)] {
            let mut bad = PROBE_FIXTURE;
            bad[i] = v;
            if i == 16 {
                bad[16..24].fill(0);
            }
            assert_eq!(Header::parse(&bad), None, "byte {i} = {v}");
        }
    }

    #[test]
    fn session_accepts_only_the_partner() {
        let me = Session {
            self_id: PeerId::from_u32(2),
            peer_id: PeerId::from_u32(1),
            nonce: 9,
            epoch: Instant::now(),
        };
        assert!(me.accept(&PROBE_FIXTURE).is_some());
        let mut other = PROBE_FIXTURE;
        other[8] = 3;
        assert!(me.accept(&other).is_none());
        let mut swapped = PROBE_FIXTURE;
        swapped[8..16].copy_from_slice(&[2, 0, 0, 0, 1, 0, 0, 0]);
        assert!(me.accept(&swapped).is_none());
    }

    #[test]
    fn exactly_one_peer_leads_each_path() {
        for both in [true, false] {
            for s in [Strategy::Seed, Strategy::Observed] {
                assert_ne!(s.leads(both, true), s.leads(both, false), "{s} both={both}");
            }
        }
        // With both strategies, each peer leads one path.
        for decider in [true, false] {
            assert_ne!(
                Strategy::Seed.leads(true, decider),
                Strategy::Observed.leads(true, decider)
            );
        }
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
