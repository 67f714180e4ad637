//! What [`connect`](super::connect) needs: the server, the two IDs, which
//! strategies to try, and every knob with its default and range.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::nat::NatType;
use super::ClientError;
use crate::wire::v2;
use crate::wire::PeerId;

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
/// Default time one attempt spends punching before it registers again
/// (stretched to fit birthday probing when this side takes part in it).
pub const DEFAULT_PUNCH_WINDOW: Duration = Duration::from_secs(3);
/// Time between probes on each path: ICE paces its checks at a similar rate.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Pause between the openers and the first normal probe: it covers the skew
/// between the moments the two peers get their replies (the server sends both
/// at once; only the two one-way delays differ).
pub const OPENER_LEAD: Duration = Duration::from_millis(100);
/// How long an attempt waits for the partner's first datagram when both
/// peers are behind one public address and the server's reply named none of
/// the partner's local addresses (protocol v2 gives them only to the peer
/// that waited, and a lost reply's replay carries none). The partner that
/// has ours probes them as soon as it has its reply, which the server sent
/// with ours: on a LAN that arrives within milliseconds, or after a lost
/// reply, never. Then registering again from a fresh socket is a new match
/// that hands one of the two the other's addresses, sooner than the whole
/// punch window would.
pub const SAME_NAT_WAIT: Duration = Duration::from_secs(1);
/// Longest time a side holds a path (sends only openers on it) while it has
/// heard nothing from the partner; see the module docs of [`super`]. 2 s is
/// the longest registration backoff, so it covers a partner whose server
/// reply was lost and who gets the replay at its next retransmit.
pub const HOLD_LIMIT: Duration = Duration::from_secs(2);
/// Largest datagram sent: 1232 bytes fits any IPv6 path (1280 minimum MTU
/// less 40 for IPv6 and 8 for UDP) with room to spare.
pub const MAX_DATAGRAM: usize = 1232;
/// Largest payload per data datagram.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - crate::wire::peer::HEADER_LEN;

/// Birthday probing defaults; `docs/nat-traversal.md` has the arithmetic.
/// Sockets the hard side opens: 256, as Tailscale does. Against the 64,512
/// ports Linux masquerade picks from, each random probe meets one of them
/// with odds of 1 in 252, so the first meeting comes after about 250 probes.
pub const DEFAULT_BIRTHDAY_SOCKETS: u16 = 256;
/// Random ports the easy side probes per attempt, at most: 3072 meet with
/// probability 1 - 5e-6 when both sides start together. The margin is for
/// a hard side that starts late (its server reply was lost and came with a
/// retransmit, up to 2 s later): the easy side's probes before that are
/// spent, and with 2048 probes 2 of 100 pairs failed that way in the lab
/// with 10% loss.
pub const DEFAULT_BIRTHDAY_PROBES: u32 = 3072;
/// Probes per second from the easy side: 40-byte datagrams, 40 kB/s while
/// it lasts. The expected first meeting comes after a quarter of a second;
/// the whole budget takes about 3 s.
pub const DEFAULT_BIRTHDAY_RATE: u32 = 1000;
/// How long the easy side punches normally before it starts probing random
/// ports, when it does not know the partner's NAT: two easy peers have
/// connected by then (a few round trips), so they never probe.
pub const DEFAULT_BIRTHDAY_DELAY: Duration = Duration::from_millis(500);
/// Upper bound on `--birthday-sockets` (file descriptors and NAT state).
pub const MAX_BIRTHDAY_SOCKETS: u16 = 1024;
/// Upper bound on `--birthday-rate`: beyond this the probes look like a flood.
pub const MAX_BIRTHDAY_RATE: u32 = 5000;

/// Default bound on the wait for a router's port mapping (NAT-PMP, PCP and
/// UPnP run at once). A router on the LAN answers in milliseconds; this is
/// what a network without one costs, and only a peer whose NAT is not easy
/// pays it.
pub const DEFAULT_PORT_MAPPING_WAIT: Duration = Duration::from_millis(700);
/// Lifetime asked for a port mapping; it is deleted at exit anyway. Routers
/// keep it at most this long if the client dies without deleting it.
pub const PORT_MAPPING_LIFETIME: Duration = Duration::from_secs(120);
/// Longest wait for the two STUN answers that classify the NAT.
pub const DEFAULT_CLASSIFY_WAIT: Duration = Duration::from_secs(1);

/// A way to reach the partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// The original psync's: bind the server-chosen `src_port`, send to the
    /// partner's public IP at `dst_port`.
    Seed,
    /// Keep the registration socket; send to the partner's public address and
    /// port as the server saw it (and follow it if it answers from another).
    Observed,
    /// When one NAT changes ports per destination: the hard side opens many
    /// sockets toward the easy side, which probes random ports until one meets.
    Birthday,
    /// Peers behind one public address (the same NAT, which rarely
    /// hairpins): the registration socket sends to the partner's local
    /// addresses, which protocol v2 relays, and answers the partner's
    /// probes from any local address.
    Local,
}

impl Strategy {
    /// Every strategy, in the order they are reported.
    pub const ALL: [Strategy; 4] = [
        Strategy::Seed,
        Strategy::Observed,
        Strategy::Birthday,
        Strategy::Local,
    ];

    /// The name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Seed => "seed",
            Strategy::Observed => "observed",
            Strategy::Birthday => "birthday",
            Strategy::Local => "local",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which router protocols to ask for a port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    /// NAT-PMP (RFC 6886).
    pub natpmp: bool,
    /// PCP (RFC 6887).
    pub pcp: bool,
    /// UPnP IGD.
    pub upnp: bool,
    /// Longest wait for an answer (all protocols run at once).
    pub wait: Duration,
}

impl PortMapping {
    /// All three protocols, [`DEFAULT_PORT_MAPPING_WAIT`].
    pub const DEFAULT: PortMapping = PortMapping {
        natpmp: true,
        pcp: true,
        upnp: true,
        wait: DEFAULT_PORT_MAPPING_WAIT,
    };

    /// True when at least one protocol is on.
    pub fn any(&self) -> bool {
        self.natpmp || self.pcp || self.upnp
    }
}

/// Birthday probing's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Birthday {
    /// Sockets the hard side opens.
    pub sockets: u16,
    /// Random ports the easy side probes per attempt.
    pub probes: u32,
    /// Probes per second.
    pub rate: u32,
    /// Normal punching before the easy side probes, if the partner's NAT is unknown.
    pub delay: Duration,
}

impl Birthday {
    /// The defaults above.
    pub const DEFAULT: Birthday = Birthday {
        sockets: DEFAULT_BIRTHDAY_SOCKETS,
        probes: DEFAULT_BIRTHDAY_PROBES,
        rate: DEFAULT_BIRTHDAY_RATE,
        delay: DEFAULT_BIRTHDAY_DELAY,
    };

    /// How long the easy side probes at most: `probes / rate`.
    pub fn probing_time(&self) -> Duration {
        Duration::from_secs_f64(f64::from(self.probes) / f64::from(self.rate.max(1)))
    }
}

/// What [`connect`](super::connect) needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The rendezvous server (in a cluster: the member that owns the pair,
    /// `psync::cluster::owner::rank`).
    pub server: SocketAddr,
    /// The other members of a cluster, tried in this order when `server`
    /// stays silent or refuses (docs/cluster.md); empty for one server.
    pub fallbacks: Vec<SocketAddr>,
    /// This peer's ID.
    pub self_id: PeerId,
    /// The partner's ID.
    pub peer_id: PeerId,
    /// One strategy only, or `None` for every strategy not in `disabled`.
    pub strategy: Option<Strategy>,
    /// Strategies not to try (ignored when `strategy` picks one).
    pub disabled: Vec<Strategy>,
    /// Bound on the whole connect.
    pub timeout: Duration,
    /// Registrations to try, each with fresh ports (at least 1).
    pub attempts: u32,
    /// TTL of the opener packets; 0 sends none.
    pub opener_ttl: u8,
    /// Time one attempt punches before registering again.
    pub punch_window: Duration,
    /// The server's second STUN port (`psync-server --stun-port`), on the
    /// server's address. Without it the NAT cannot be classified.
    pub stun_port: Option<u16>,
    /// Ask the server (STUN) how our NAT maps before registering.
    pub classify: bool,
    /// Longest wait for the classification's STUN answers.
    pub classify_wait: Duration,
    /// Router port mapping.
    pub port_mapping: PortMapping,
    /// Birthday probing's counts.
    pub birthday: Birthday,
    /// The partner's NAT type if it is known in advance; `None` to learn it
    /// from the server's v2 reply (the partner's client info), if any.
    /// Knowing it skips steps.
    pub partner_nat: Option<NatType>,
    /// Protocol v2: the token from the application's backend, which names
    /// both 64-bit IDs. With one, the client registers with v2 requests
    /// (authenticated, with its client info and local candidates; see
    /// PROTOCOL.md), and `self_id`/`peer_id` are the IDs' low 32 bits
    /// ([`handshake_id`]); without, with the 8-byte seed request.
    pub token: Option<v2::Token>,
}

/// The 4-byte ID a v2 peer puts in the peer handshake (whose `from` and `to`
/// fields are 32 bits): the low 32 bits of its 64-bit ID, as
/// [`PeerId::from_u32`] writes them. Both peers derive both IDs the same
/// way, so they agree on who decides.
pub fn handshake_id(id: u64) -> PeerId {
    PeerId::from_u32(id as u32)
}

impl ClientConfig {
    /// A config with the defaults: every strategy, classification on (it
    /// needs `stun_port` to tell easy from hard), every port-mapping protocol,
    /// [`DEFAULT_TIMEOUT`], [`DEFAULT_ATTEMPTS`], [`DEFAULT_OPENER_TTL`],
    /// [`DEFAULT_PUNCH_WINDOW`].
    pub fn new(server: SocketAddr, self_id: PeerId, peer_id: PeerId) -> ClientConfig {
        ClientConfig {
            server,
            fallbacks: Vec::new(),
            self_id,
            peer_id,
            strategy: None,
            disabled: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            opener_ttl: DEFAULT_OPENER_TTL,
            punch_window: DEFAULT_PUNCH_WINDOW,
            stun_port: None,
            classify: true,
            classify_wait: DEFAULT_CLASSIFY_WAIT,
            port_mapping: PortMapping::DEFAULT,
            birthday: Birthday::DEFAULT,
            partner_nat: None,
            token: None,
        }
    }

    /// A config for protocol v2 with `token` (see [`ClientConfig::new`] for
    /// the defaults): the IDs come from the token.
    pub fn with_token(server: SocketAddr, token: v2::Token) -> ClientConfig {
        let mut c = ClientConfig::new(
            server,
            handshake_id(token.pair.self_id),
            handshake_id(token.pair.peer_id),
        );
        c.token = Some(token);
        c
    }

    /// Whether `s` is to be tried.
    pub fn enabled(&self, s: Strategy) -> bool {
        match self.strategy {
            Some(only) => only == s,
            None => !self.disabled.contains(&s),
        }
    }

    /// The strategies to try, in [`Strategy::ALL`] order.
    pub fn strategies(&self) -> Vec<Strategy> {
        Strategy::ALL
            .into_iter()
            .filter(|&s| self.enabled(s))
            .collect()
    }

    /// The server's STUN port address, if configured.
    pub fn stun_server(&self) -> Option<SocketAddr> {
        self.stun_port
            .map(|p| SocketAddr::new(self.server.ip(), p))
            .filter(|a| *a != self.server)
    }

    /// Checks every setting; the error names the flag.
    pub fn check(&self) -> Result<(), ClientError> {
        let bad = |m: &str| Err(ClientError::Config(m.to_string()));
        if let Some(t) = &self.token {
            let pair = t.pair;
            if pair.is_self_pair() {
                return bad("the token names the same ID for both peers");
            }
            if (self.self_id, self.peer_id)
                != (handshake_id(pair.self_id), handshake_id(pair.peer_id))
            {
                return bad("--self and --peer must be the token's IDs (or left out)");
            }
            if self.self_id == self.peer_id {
                return Err(ClientError::Config(format!(
                    "the token's IDs {:#x} and {:#x} agree in their low 32 bits, which the \
                     peer handshake carries: the backend must issue IDs that differ there",
                    pair.self_id, pair.peer_id
                )));
            }
        }
        if self.self_id == self.peer_id {
            return bad("--self and --peer must differ");
        }
        if self.attempts == 0 {
            return bad("--attempts must be at least 1");
        }
        if self.timeout.is_zero() {
            return bad("--timeout must be above 0");
        }
        if self.punch_window.is_zero() {
            return bad("--punch-window must be above 0");
        }
        if self.strategies().is_empty() {
            return bad("every strategy is turned off: nothing to try");
        }
        let b = &self.birthday;
        if b.sockets == 0 || b.sockets > MAX_BIRTHDAY_SOCKETS {
            return Err(ClientError::Config(format!(
                "--birthday-sockets must be 1 to {MAX_BIRTHDAY_SOCKETS}"
            )));
        }
        if b.rate == 0 || b.rate > MAX_BIRTHDAY_RATE {
            return Err(ClientError::Config(format!(
                "--birthday-rate must be 1 to {MAX_BIRTHDAY_RATE} per second"
            )));
        }
        if b.probes == 0 || b.probes > u32::from(u16::MAX) {
            return bad("--birthday-probes must be 1 to 65535");
        }
        if self.stun_port == Some(0) {
            return bad("--stun-port must be 1 to 65535");
        }
        Ok(())
    }
}
