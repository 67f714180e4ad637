//! A cluster of psync servers that act as one rendezvous: any member
//! accepts either half of a pair, and the pair's owner matches it.
//!
//! - **Members** are listed statically (`--cluster-peer`) or by DNS
//!   (`--cluster-dns`, [`dns`]); each is known by its cluster address
//!   (`--cluster-bind`), and is *live* while its heartbeats arrive (a member
//!   silent for `--cluster-timeout` is not; one that says it is leaving is
//!   not, at once). A member just listed counts as live until its timeout
//!   runs out, so a cluster that starts together agrees at once.
//! - **The owner** of a pair is the live member with the highest
//!   rendezvous-hash score ([`owner`]); every member computes the same one
//!   from the same list.
//! - **Forwarding.** A member that is not the owner seals the request, the
//!   client's address and its own identity into a forward
//!   ([`crate::wire::cluster`]) and sends it to the owner. The owner's
//!   engine takes it with a relay index, `via`, that names the forwarder
//!   ([`crate::engine::Engine::handle_relayed`]); each reply with a nonzero
//!   `via` goes back to that member in a reply datagram, and that member
//!   sends it to the client from the address the client sent to. A
//!   forwarded request is handed to the engine, never forwarded again
//!   ([`Received::Request`] has no other way out): one hop at most, and a
//!   disagreement about the members costs a retransmit, never a loop.
//! - **Authentication and replay.** Every datagram ends in a MAC made with
//!   the shared key ([`key`]). A receiver refuses, and counts, a datagram
//!   that is malformed, from a sender that is not a listed member, stale
//!   (sent more than [`MAX_CLOCK_SKEW_MS`] from now, or before this process
//!   started, or by an older incarnation of its sender), with a bad MAC, or
//!   seen before (a sliding window per sender and lane, [`replay`]).
//!
//! [`Cluster`] is the membership and the receiving side, pure like the
//! engine: datagrams and the time ([`Now`]) in, datagrams out, no socket,
//! no clock. A [`Sealer`] makes datagrams for one sending thread (a lane);
//! [`Routes`] is what a receiving thread needs to pick owners and map a
//! `via` back to a member: a snapshot, rebuilt (with a new generation) when
//! the live set changes.

pub mod config;
pub mod dns;
pub mod key;
pub mod owner;
pub mod port;
pub mod replay;

use std::net::SocketAddr;

use crate::wire::cluster::{Body, Header, Kind, Message, View};
pub use config::{ClusterConfig, ConfigError, MemberSource};
pub use key::ClusterKey;
pub use owner::{pair_key, PairKey};
pub use port::{ClusterLane, ClusterPort, ClusterSettings, ClusterStatus, SharedRoutes};
use replay::ReplayWindow;

/// Most members besides this one: a relay index (`via`) is one byte, and 0
/// means "straight from the client".
pub const MAX_PEERS: usize = 255;
/// Sending threads (lanes) a sender may use; sequence numbers count per lane.
pub const LANES: usize = 256;
/// The lane of the thread that runs the [`Cluster`] (heartbeats).
pub const CLUSTER_LANE: u8 = 0;
/// How far a datagram's send time may be from the receiver's clock, either
/// way. Members' clocks must agree this well (NTP keeps them within
/// milliseconds); a captured datagram is refused once this has passed.
pub const MAX_CLOCK_SKEW_MS: u64 = 5_000;
/// Heartbeats a member sends each other member per `--cluster-timeout`.
pub const HEARTBEATS_PER_TIMEOUT: u64 = 4;

/// The time, twice: a monotonic clock for liveness and schedules, and the
/// wall clock for the send times members compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds on the caller's monotonic clock.
    pub mono_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// Who owns a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// This member: hand the request to the engine.
    Me,
    /// Another member, by relay index: forward the request there.
    Member(u8),
}

/// What a receiving thread needs: the live members for owner choice, and
/// every listed member's address by relay index. Rebuilt with a new
/// generation whenever either changes.
#[derive(Clone, Debug)]
pub struct Routes {
    generation: u64,
    /// Live members' hashes and relay indexes (0: this member).
    live: Vec<(u64, u8)>,
    /// Cluster address by relay index; index 0 is unused.
    addrs: Box<[Option<SocketAddr>]>,
}

impl Routes {
    fn new() -> Routes {
        Routes {
            generation: 0,
            live: Vec::new(),
            addrs: vec![None; MAX_PEERS + 1].into_boxed_slice(),
        }
    }

    /// Changes at every rebuild.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The owner of `key`; this member when no member is live (alone, or
    /// not listed and nobody heard from yet).
    #[inline]
    pub fn owner(&self, key: PairKey) -> Owner {
        let mut best: Option<(u64, u8)> = None;
        for &(hash, via) in &self.live {
            let s = owner::score(key, hash);
            match best {
                Some((b, _)) if b >= s => {}
                _ => best = Some((s, via)),
            }
        }
        match best {
            None | Some((_, 0)) => Owner::Me,
            Some((_, via)) => Owner::Member(via),
        }
    }

    /// The cluster address of relay index `via` (a listed member, live or
    /// not), for a reply; `None` for 0 and for unused indexes.
    #[inline]
    pub fn member(&self, via: u8) -> Option<SocketAddr> {
        self.addrs[usize::from(via)]
    }

    /// How many members are live, this one included when it is.
    pub fn live_len(&self) -> usize {
        self.live.len()
    }
}

/// Makes sealed datagrams for one sending thread: its own lane and
/// sequence numbers, so threads never share a counter.
#[derive(Clone, Debug)]
pub struct Sealer {
    key: ClusterKey,
    me: SocketAddr,
    incarnation: u64,
    lane: u8,
    seq: u64,
    /// Forwards made.
    pub forwarded: u64,
    /// Replies made.
    pub replies: u64,
}

impl Sealer {
    /// A forward of `request` from `client` into `buf`; its length, or
    /// `None` when the request is empty or longer than
    /// [`crate::wire::cluster::MAX_PAYLOAD`] (or `buf` too short).
    pub fn forward(
        &mut self,
        client: SocketAddr,
        request: &[u8],
        unix_ms: u64,
        buf: &mut [u8],
    ) -> Option<usize> {
        let n = self.seal(Body::Forward { client, request }, unix_ms, buf)?;
        self.forwarded += 1;
        Some(n)
    }

    /// A reply for `client` into `buf`, as [`Sealer::forward`].
    pub fn reply(
        &mut self,
        client: SocketAddr,
        reply: &[u8],
        unix_ms: u64,
        buf: &mut [u8],
    ) -> Option<usize> {
        let n = self.seal(Body::Reply { client, reply }, unix_ms, buf)?;
        self.replies += 1;
        Some(n)
    }

    fn heartbeat(&mut self, leaving: bool, unix_ms: u64, buf: &mut [u8]) -> Option<usize> {
        self.seal(Body::Heartbeat { leaving }, unix_ms, buf)
    }

    fn seal(&mut self, body: Body<'_>, unix_ms: u64, buf: &mut [u8]) -> Option<usize> {
        let msg = Message {
            header: Header {
                kind: Kind::Heartbeat, // emit takes the kind from the body
                lane: self.lane,
                sender: self.me,
                incarnation: self.incarnation,
                seq: self.seq + 1,
                sent_ms: unix_ms,
            },
            body,
        };
        let n = msg.emit(buf)?;
        self.seq += 1;
        self.key.seal(&mut buf[..n]);
        Some(n)
    }
}

/// Why a cluster datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not a well-formed cluster datagram.
    Malformed,
    /// The sender is not a listed member (or claims to be this one).
    UnknownSender,
    /// Sent too long ago or in the future, before this process started, or
    /// by an older incarnation of its sender.
    Stale,
    /// The MAC does not match the cluster key.
    BadMac,
    /// Seen before (or too old for the replay window).
    Replayed,
}

/// What a received cluster datagram asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received<'d> {
    /// A forwarded request: hand it to the engine with this relay index.
    /// Never forward it again.
    Request {
        /// The forwarding member's relay index (never 0).
        via: u8,
        /// The client's public address, the request's source.
        client: SocketAddr,
        /// The request's bytes.
        request: &'d [u8],
    },
    /// A reply to send to a client from the client socket of its family.
    Reply {
        /// Where it goes.
        client: SocketAddr,
        /// Its bytes.
        reply: &'d [u8],
    },
    /// A heartbeat; membership is updated.
    Heartbeat,
    /// Refused and counted; nothing to do.
    Rejected(Rejection),
}

/// The cluster's counters (the sealers' are added by the caller).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCounters {
    /// Forwarded requests accepted from other members.
    pub forwarded_in: u64,
    /// Replies accepted from owners, for clients of this member.
    pub replies_in: u64,
    /// Heartbeats accepted.
    pub heartbeats_in: u64,
    /// Heartbeats sent.
    pub heartbeats_out: u64,
    /// Refused: malformed.
    pub rejected_malformed: u64,
    /// Refused: not from a listed member.
    pub rejected_unknown_sender: u64,
    /// Refused: stale.
    pub rejected_stale: u64,
    /// Refused: bad MAC.
    pub rejected_bad_mac: u64,
    /// Refused: replayed.
    pub rejected_replayed: u64,
}

impl ClusterCounters {
    /// Every refused cluster datagram (`forward_rejected`).
    pub fn rejected(&self) -> u64 {
        self.rejected_malformed
            + self.rejected_unknown_sender
            + self.rejected_stale
            + self.rejected_bad_mac
            + self.rejected_replayed
    }

    /// Refusals by reason, as `/metrics` labels them.
    pub fn rejected_by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("malformed", self.rejected_malformed),
            ("unknown_sender", self.rejected_unknown_sender),
            ("stale", self.rejected_stale),
            ("bad_mac", self.rejected_bad_mac),
            ("replayed", self.rejected_replayed),
        ]
    }
}

/// One member as `/metrics` and the stats line show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its cluster address.
    pub addr: SocketAddr,
    /// Its relay index.
    pub via: u8,
    /// Whether it counts for owner choice now.
    pub live: bool,
    /// Milliseconds since its last authenticated datagram; `None` if never.
    pub heard_ms_ago: Option<u64>,
    /// It said it is leaving (this incarnation).
    pub leaving: bool,
}

/// What a new member list changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListChange {
    /// Members new to the list.
    pub added: usize,
    /// Members no longer listed.
    pub removed: usize,
    /// Addresses left out: of the other family, or beyond [`MAX_PEERS`].
    pub ignored: usize,
    /// This member is in the list.
    pub me_listed: bool,
}

struct Member {
    addr: SocketAddr,
    hash: u64,
    listed: bool,
    /// When it was (last) listed, or unlisted (monotonic ms).
    changed_at: u64,
    /// Its last authenticated datagram (monotonic ms).
    heard: Option<u64>,
    /// The highest incarnation heard from it (0: none yet).
    incarnation: u64,
    /// It said it is leaving, in `incarnation`.
    left: bool,
    lanes: Box<[ReplayWindow]>,
}

impl Member {
    fn live(&self, now: u64, timeout: u64) -> bool {
        let last = self.heard.unwrap_or(0).max(self.changed_at);
        self.listed && !self.left && now.saturating_sub(last) < timeout
    }
}

/// Membership, liveness, heartbeats and the checks on every received
/// cluster datagram. See the module docs.
pub struct Cluster {
    me: SocketAddr,
    my_hash: u64,
    start_unix_ms: u64,
    timeout_ms: u64,
    heartbeat_ms: u64,
    me_listed: bool,
    leaving: bool,
    /// By relay index; index 0 is this member and stays empty.
    members: Vec<Option<Member>>,
    /// Where the next new member's slot search starts (slots are reused as
    /// late as possible, so a remembered `via` keeps meaning its member).
    next_slot: usize,
    routes: Routes,
    sealer: Sealer,
    /// When the next heartbeat round starts.
    next_round: u64,
    /// The next member of the round in hand to send to.
    round: Option<usize>,
    counters: ClusterCounters,
}

impl Cluster {
    /// A member with address `cfg.bind`, started now (its incarnation is
    /// `now.unix_ms`), with no one listed yet: call
    /// [`Cluster::set_members`]. The caller has validated `cfg`.
    pub fn new(cfg: &ClusterConfig, now: Now) -> Cluster {
        let timeout_ms = cfg.timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u64;
        let mut c = Cluster {
            me: cfg.bind,
            my_hash: owner::member_hash(cfg.bind.ip()),
            start_unix_ms: now.unix_ms,
            timeout_ms,
            heartbeat_ms: (timeout_ms / HEARTBEATS_PER_TIMEOUT).max(1),
            me_listed: false,
            leaving: false,
            members: (0..=MAX_PEERS).map(|_| None).collect(),
            next_slot: 1,
            routes: Routes::new(),
            sealer: Sealer {
                key: cfg.key.clone(),
                me: cfg.bind,
                incarnation: now.unix_ms,
                lane: CLUSTER_LANE,
                seq: 0,
                forwarded: 0,
                replies: 0,
            },
            next_round: now.mono_ms,
            round: None,
            counters: ClusterCounters::default(),
        };
        c.rebuild(now.mono_ms);
        c
    }

    /// This member's cluster address.
    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// This process's incarnation (its start, Unix ms).
    pub fn incarnation(&self) -> u64 {
        self.sealer.incarnation
    }

    /// A sealer for sending thread `lane` (1 and up; 0 is this one's).
    pub fn sealer(&self, lane: u8) -> Sealer {
        Sealer {
            lane,
            seq: 0,
            forwarded: 0,
            replies: 0,
            ..self.sealer.clone()
        }
    }

    /// The routes now.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The counters now.
    pub fn counters(&self) -> ClusterCounters {
        self.counters
    }

    /// Replaces the member list (the static list once, or each DNS answer).
    /// This member's own address may be in it; addresses of the other
    /// family are ignored. Members no longer listed stop counting at once;
    /// new ones count as live until `--cluster-timeout` passes without a
    /// word from them.
    pub fn set_members(&mut self, list: &[SocketAddr], now: Now) -> ListChange {
        let mut change = ListChange::default();
        let mut wanted: Vec<SocketAddr> = Vec::with_capacity(list.len());
        for &a in list {
            if a == self.me {
                change.me_listed = true;
            } else if a.is_ipv4() != self.me.is_ipv4() || a.ip() == self.me.ip() {
                change.ignored += 1;
            } else if !wanted.contains(&a) {
                wanted.push(a);
            }
        }
        wanted.sort();
        if wanted.len() > MAX_PEERS {
            change.ignored += wanted.len() - MAX_PEERS;
            wanted.truncate(MAX_PEERS);
        }
        self.me_listed = change.me_listed;
        for m in self.members.iter_mut().flatten() {
            if m.listed && !wanted.contains(&m.addr) {
                m.listed = false;
                m.changed_at = now.mono_ms;
                change.removed += 1;
            }
        }
        for a in wanted {
            if let Some(m) = self.members.iter_mut().flatten().find(|m| m.addr == a) {
                if !m.listed {
                    m.listed = true;
                    m.changed_at = now.mono_ms;
                    change.added += 1;
                }
                continue;
            }
            let Some(slot) = self.free_slot() else {
                change.ignored += 1;
                continue;
            };
            self.members[slot] = Some(Member {
                addr: a,
                hash: owner::member_hash(a.ip()),
                listed: true,
                changed_at: now.mono_ms,
                heard: None,
                incarnation: 0,
                left: false,
                lanes: vec![ReplayWindow::default(); LANES].into_boxed_slice(),
            });
            change.added += 1;
        }
        self.rebuild(now.mono_ms);
        change
    }

    /// A slot for a new member: a free one, searching from after the last
    /// one given; else the one unlisted longest ago.
    fn free_slot(&mut self) -> Option<usize> {
        for k in 0..MAX_PEERS {
            let slot = 1 + (self.next_slot - 1 + k) % MAX_PEERS;
            if self.members[slot].is_none() {
                self.next_slot = 1 + slot % MAX_PEERS;
                return Some(slot);
            }
        }
        let (slot, _) = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.as_ref().filter(|m| !m.listed).map(|m| (i, m.changed_at)))
            .min_by_key(|&(_, t)| t)?;
        self.members[slot] = None;
        Some(slot)
    }

    /// Recomputes the live set; a new [`Routes`] generation if it changed.
    fn rebuild(&mut self, now: u64) {
        let mut live: Vec<(u64, u8)> = Vec::with_capacity(self.routes.live.len() + 1);
        if self.me_listed && !self.leaving {
            live.push((self.my_hash, 0));
        }
        let mut addrs_changed = false;
        for (i, m) in self.members.iter().enumerate().skip(1) {
            let addr = m.as_ref().filter(|m| m.listed).map(|m| m.addr);
            if self.routes.addrs[i] != addr {
                addrs_changed = true;
            }
            if let Some(m) = m {
                if m.live(now, self.timeout_ms) {
                    live.push((m.hash, i as u8));
                }
            }
        }
        if live != self.routes.live || addrs_changed || self.routes.generation == 0 {
            self.routes.live = live;
            for (i, m) in self.members.iter().enumerate().skip(1) {
                self.routes.addrs[i] = m.as_ref().filter(|m| m.listed).map(|m| m.addr);
            }
            self.routes.generation += 1;
        }
    }

    /// Runs timers: members whose timeout ran out leave the live set.
    /// Returns true when the routes changed.
    pub fn tick(&mut self, now: Now) -> bool {
        let g = self.routes.generation;
        self.rebuild(now.mono_ms);
        g != self.routes.generation
    }

    /// When [`Cluster::tick`] or [`Cluster::poll_transmit`] next has work
    /// (monotonic ms; `now` or earlier: at once).
    pub fn poll_timeout(&self, now: Now) -> u64 {
        if self.round.is_some() {
            return now.mono_ms;
        }
        let mut t = self.next_round;
        for m in self.members.iter().flatten() {
            if m.live(now.mono_ms, self.timeout_ms) {
                let last = m.heard.unwrap_or(0).max(m.changed_at);
                t = t.min(last + self.timeout_ms);
            }
        }
        t
    }

    /// This member is shutting down: it no longer owns any pair (forwarding
    /// everything it receives to the others while it drains), and its next
    /// heartbeats, starting now, say it is leaving, so the others re-home
    /// its pairs at once.
    pub fn leave(&mut self, now: Now) {
        self.leaving = true;
        self.next_round = now.mono_ms;
        self.round = None;
        self.rebuild(now.mono_ms);
    }

    /// Whether [`Cluster::leave`] was called.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// The next heartbeat due, sealed into `buf`, and where it goes; `None`
    /// when none is due. Call until `None` after every wake-up. Every listed
    /// member gets one each `--cluster-timeout` / 4, live or not (so a
    /// member back from the dead hears from us).
    pub fn poll_transmit(&mut self, now: Now, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        if self.round.is_none() && now.mono_ms >= self.next_round {
            self.round = Some(1);
            self.next_round = now.mono_ms + self.heartbeat_ms;
        }
        let start = self.round?;
        let next = (start..self.members.len())
            .find(|&i| self.members[i].as_ref().is_some_and(|m| m.listed));
        let Some(i) = next else {
            self.round = None;
            return None;
        };
        self.round = Some(i + 1);
        let to = self.members[i].as_ref().map(|m| m.addr)?;
        let n = self.sealer.heartbeat(self.leaving, now.unix_ms, buf)?;
        self.counters.heartbeats_out += 1;
        Some((to, n))
    }

    /// Every listed member (and those unlisted but still holding a relay
    /// index), for `/metrics` and the stats line.
    pub fn members(&self, now: Now) -> Vec<MemberStatus> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let m = m.as_ref().filter(|m| m.listed)?;
                Some(MemberStatus {
                    addr: m.addr,
                    via: i as u8,
                    live: m.live(now.mono_ms, self.timeout_ms),
                    heard_ms_ago: m.heard.map(|h| now.mono_ms.saturating_sub(h)),
                    leaving: m.left,
                })
            })
            .collect()
    }

    /// Checks a datagram received on the cluster socket and says what to do
    /// with it. Refusals are counted and change nothing.
    pub fn receive<'d>(&mut self, datagram: &'d [u8], now: Now) -> Received<'d> {
        match self.check(datagram, now) {
            Ok(r) => r,
            Err(why) => {
                let c = &mut self.counters;
                match why {
                    Rejection::Malformed => c.rejected_malformed += 1,
                    Rejection::UnknownSender => c.rejected_unknown_sender += 1,
                    Rejection::Stale => c.rejected_stale += 1,
                    Rejection::BadMac => c.rejected_bad_mac += 1,
                    Rejection::Replayed => c.rejected_replayed += 1,
                }
                Received::Rejected(why)
            }
        }
    }

    fn check<'d>(&mut self, datagram: &'d [u8], now: Now) -> Result<Received<'d>, Rejection> {
        // Cheap checks first: garbage and strangers cost no MAC.
        let view = View::new_checked(datagram).map_err(|_| Rejection::Malformed)?;
        let msg = view.to_repr().map_err(|_| Rejection::Malformed)?;
        let h = msg.header;
        if h.incarnation > h.sent_ms {
            return Err(Rejection::Malformed);
        }
        let via = self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.listed && m.addr == h.sender))
            .ok_or(Rejection::UnknownSender)?;
        let timeout = self.timeout_ms;
        let member = self.members[via].as_mut().ok_or(Rejection::UnknownSender)?;
        let fresh =
            h.sent_ms.abs_diff(now.unix_ms) <= MAX_CLOCK_SKEW_MS && h.sent_ms >= self.start_unix_ms;
        // An older incarnation is refused while the newer one we know is
        // heard from; once that one has been silent for the timeout, the
        // sender may have restarted with its clock set back.
        let heard_lately = member
            .heard
            .is_some_and(|t| now.mono_ms.saturating_sub(t) < timeout);
        if !fresh || (h.incarnation < member.incarnation && heard_lately) {
            return Err(Rejection::Stale);
        }
        if !self.sealer.key.verify(view.signed(), view.mac()) {
            return Err(Rejection::BadMac);
        }
        // Authenticated: now it may change state.
        if h.incarnation != member.incarnation {
            member.incarnation = h.incarnation;
            member.left = false;
            member.lanes.iter_mut().for_each(ReplayWindow::reset);
        }
        member.lanes[usize::from(h.lane)]
            .accept(h.seq)
            .map_err(|_| Rejection::Replayed)?;
        member.heard = Some(now.mono_ms);
        let received = match msg.body {
            Body::Forward { client, request } => {
                self.counters.forwarded_in += 1;
                Received::Request {
                    via: via as u8,
                    client,
                    request,
                }
            }
            Body::Reply { client, reply } => {
                if crate::engine::source::is_bogus(client) {
                    return Err(Rejection::Malformed);
                }
                self.counters.replies_in += 1;
                Received::Reply { client, reply }
            }
            Body::Heartbeat { leaving } => {
                self.counters.heartbeats_in += 1;
                if leaving {
                    member.left = true;
                }
                Received::Heartbeat
            }
        };
        let is_live = self.members[via]
            .as_ref()
            .is_some_and(|m| m.live(now.mono_ms, timeout));
        let routed = self.routes.live.iter().any(|&(_, v)| usize::from(v) == via);
        if is_live != routed {
            self.rebuild(now.mono_ms);
        }
        Ok(received)
    }
}

#[cfg(test)]
mod tests;
