//! The peer side of psync: learn the NAT, register with the server, punch
//! the hole, prove the path.
//!
//! [`connect`] does the whole job for one peer and returns a [`Connection`]
//! whose UDP socket is known to work in both directions. Each attempt:
//!
//! 1. **Classify** ([`nat`]). From a fresh socket, ask the server's port and
//!    its `--stun-port` "what is my address?" (STUN Binding). One public
//!    port for both means the NAT is *easy* (endpoint-independent mapping, or
//!    no NAT); two ports mean *hard* (a new port per destination). Without a
//!    second port, or without answers (an old server), the type is unknown.
//! 2. **Map** ([`portmap`]). If the NAT is not known to be easy, ask the
//!    router (PCP, NAT-PMP and UPnP at once, one short bounded wait) to
//!    forward the public port the server just saw to our socket. Granted, a
//!    hard NAT becomes reachable there (`hard-mapped`). This happens before
//!    registering, so the mapping is in place before the partner's first
//!    packet can arrive (a packet that comes first makes the NAT record a
//!    flow to itself, which later packets would follow instead).
//! 3. **Register** ([`registration`]). Send the 8-byte request from the same
//!    socket, retransmitting with backoff, until the server answers with the
//!    partner's public address and two ports. A bad reply is an error
//!    ([`ClientError::BadReply`]), never a crash.
//! 4. **Open and punch** ([`punch`]). Send one opener per path with a low TTL
//!    ([`DEFAULT_OPENER_TTL`]): it leaves our own NAT, which creates the
//!    mapping, and dies before it reaches the partner's NAT. Then probe every
//!    [`PROBE_INTERVAL`]. The paths:
//!    - `seed`, the original psync's: bind the `src_port` the server chose and
//!      send to the partner's public IP at `dst_port`;
//!    - `observed`: keep the registration socket and send to the partner's
//!      address exactly as the server saw it, following the partner if it
//!      answers from another port;
//!    - `birthday`, when one NAT is hard: the hard side opens 256 sockets and
//!      sends an opener from each toward the easy side's observed address;
//!      the easy side, once [`DEFAULT_BIRTHDAY_DELAY`] of normal punching has
//!      not connected, probes random ports of the hard side's IP (1000/s, at
//!      most 3072) until one of them is a mapping the hard side just made.
//!      Each side picks its role from its own classification
//!      ([`nat::roles`]); the arithmetic is in [`birthday`] and
//!      `docs/nat-traversal.md`.
//!    - `local`, when the server saw both peers at one public IP (one NAT,
//!      which rarely hairpins) and protocol v2 relayed local addresses:
//!      the registration socket probes the partner's local addresses at
//!      once, and a valid datagram there from any address is the partner on
//!      its LAN (it becomes a path: the peer whose reply named none of the
//!      partner's addresses learns one this way). Without any, the attempt
//!      ends after [`config::SAME_NAT_WAIT`] and registers again. Birthday
//!      probing and the both-hard verdict do not apply behind one NAT.
//!
//!    On the seed and observed paths one side *leads*: it probes from
//!    [`OPENER_LEAD`] on. The other side *holds*: it sends only openers until
//!    it hears anything from the partner, then probes every path normally.
//!    The deciding peer (below) leads `observed` and holds `seed`; the other
//!    peer the reverse; with one of them, the deciding peer leads it. Why:
//!    when one side's server reply is lost, that side gets the replay only at
//!    its next registration retransmit, 0.25 to 2 s late. The early side's
//!    probes on the path it leads then reach the late side's NAT before the
//!    late side's opener, which loses that path to the Linux conntrack race
//!    (the NAT records the inbound flow first and gives our own flow another
//!    port). The path the early side holds stays clean. A side that has heard
//!    nothing after [`HOLD_LIMIT`] (at most two thirds of the punch window)
//!    probes every path anyway. A hard NAT holds only its `observed` path,
//!    and only while an easy partner may be probing random ports of it
//!    (birthday, unless v2 says the partner is mapped): its probes there
//!    would make the partner's NAT move the partner's random probes to
//!    another public port (`docs/nat-traversal.md`). Otherwise it changes
//!    the port for the partner anyway, so the race cannot hurt it.
//! 5. **Prove.** A probe is answered at once by a reply that echoes its nonce.
//!    A side has completed a path when it has received the partner's probe and
//!    seen its own nonce echoed. The peer with the lower ID (bytewise) decides:
//!    the first path it completes wins, and it tells the partner with a `done`
//!    message, which the partner echoes. Both ends therefore end up on the same
//!    path even when several work. Foreign or malformed datagrams are ignored.
//! 6. **Retry.** If no path completes within the punch window, register again
//!    from a *new* socket, up to `attempts` times: the server replays the old
//!    reply to a retransmit from the same source, while a new source is a
//!    fresh registration. A hard side waits to be found until the timeout
//!    instead (its partner may start late), then gives up without
//!    registering again: that cannot help when both NATs are hard.
//!
//! Everything, retries included, fits in `timeout`; the only overrun is the
//! deciding peer's wait for the partner's echo of `done`, at most 500 ms past it.
//! The datagrams two peers exchange are in [`crate::wire::peer`] and in
//! `PROTOCOL.md`.
//!
//! Layout: [`config`] (what to do), [`nat`], [`portmap`], [`registration`],
//! [`punch`] and [`birthday`] (each sans-IO or a pure codec where it speaks a
//! protocol), [`connector`] (the whole connect as one sans-IO state machine),
//! `driver` (the mio loop: sockets and clock only), `session` (the
//! [`Connection`] and its pipe), [`report`] (what `--json` prints).
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
//! cfg.stun_port = Some(3478); // the server runs with --stun-port 3478
//! let conn = connect(&cfg)?;
//! eprintln!("connected via {} to {} (our NAT: {})", conn.strategy, conn.peer, conn.report.nat_type());
//! conn.send(b"hello")?;
//! let mut buf = [0u8; 1500];
//! if let Some(n) = conn.recv(&mut buf, Duration::from_secs(5))? {
//!     println!("{}", String::from_utf8_lossy(&buf[..n]));
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod birthday;
pub mod config;
pub mod connector;
mod driver;
mod error;
pub mod nat;
pub mod portmap;
pub mod punch;
pub mod registration;
pub mod report;
mod session;

pub use config::{
    handshake_id, Birthday, ClientConfig, PortMapping, Strategy, DEFAULT_ATTEMPTS,
    DEFAULT_BIRTHDAY_DELAY, DEFAULT_BIRTHDAY_PROBES, DEFAULT_BIRTHDAY_RATE,
    DEFAULT_BIRTHDAY_SOCKETS, DEFAULT_OPENER_TTL, DEFAULT_PUNCH_WINDOW, DEFAULT_TIMEOUT,
    HOLD_LIMIT, MAX_DATAGRAM, MAX_PAYLOAD, OPENER_LEAD, PROBE_INTERVAL,
};
pub use driver::Failure;
pub use error::ClientError;
pub use nat::NatType;
pub use report::ConnectReport;
pub use session::{Connection, PipeConfig, PipeStats};

/// Length of the header every peer-to-peer datagram starts with.
pub use crate::wire::peer::HEADER_LEN;

/// Registers, punches, and returns the first proven path. See the module
/// docs for the steps.
pub fn connect(cfg: &ClientConfig) -> Result<Connection, ClientError> {
    connect_with_report(cfg).map_err(|f| f.error)
}

/// [`connect`], with what was learned on the way (NAT classification,
/// mapping, strategies tried, datagrams sent) also when it fails.
pub fn connect_with_report(cfg: &ClientConfig) -> Result<Connection, Failure> {
    if let Err(error) = cfg.check() {
        return Err(Failure {
            error,
            report: Box::default(),
        });
    }
    driver::run(cfg)
}
