//! The cluster's socket and what drives it from a server loop: the I/O
//! around the pure [`Cluster`].
//!
//! A [`ClusterPort`] owns the cluster UDP socket (`--cluster-bind`), the
//! [`Cluster`] state machine and, with `--cluster-dns`, the resolver
//! thread. The worker that owns it takes what arrives on the cluster socket
//! from [`ClusterPort::next`] (forwarded requests for an engine, replies
//! for clients) and runs [`ClusterPort::timers`] every turn (heartbeats,
//! liveness, DNS answers). Each worker asks its [`ClusterLane`], per client
//! request, whether another member owns the pair ([`ClusterLane::owner`])
//! and if so hands the request over ([`ClusterLane::forward`]); it sends
//! each engine reply with a nonzero relay index back through
//! [`ClusterLane::relay`].
//!
//! Every worker (the port's included) sends with a lane of its own
//! ([`ClusterPort::lane`]): its own sealer and sequence numbers, a duplicate
//! of the cluster socket, and the owner choice from [`SharedRoutes`], a
//! snapshot that changes only with membership (one atomic load per batch to
//! notice). With several workers, the port's worker hands each forwarded
//! request to the worker that owns its pair (the steering program's twin).
//!
//! Datagrams to other members are queued and sent with `sendmmsg` when the
//! loop flushes ([`ClusterPort::flush`], after each batch), or at once with
//! `send_to` when longer than a queue slot (a forward of a v2 request); one
//! the socket cannot take is dropped and counted (the client retransmits).
//! Nothing here allocates per datagram;
//! logging is per event (a member's liveness, a DNS answer), never per
//! datagram above `debug`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::{Interest, Registry, Token, Waker};

use super::dns::Resolver;
use super::{
    pair_key, Cluster, ClusterConfig, ClusterCounters, MemberSource, MemberStatus, Now, Owner,
    Received, Routes, Sealer,
};
use crate::sys::{self, RecvBatch, SendQueue, SEND_SLOT_LEN};
use crate::wire::cluster::{MAX_LEN, MAX_PAYLOAD};

/// What the server needs to run as a member: the cluster's settings and
/// how long to keep relaying after SIGTERM.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Membership, identity, key, timeout.
    pub config: ClusterConfig,
    /// `--cluster-drain`: after SIGTERM, how long the member keeps serving
    /// (forwarding every request, relaying replies) once it has told the
    /// others it leaves.
    pub drain: Duration,
}

/// Datagrams read from the cluster socket per call of [`ClusterPort::next`]
/// before the loop gets its turn back (the loop's own budget is per wake-up).
const RECV_BUDGET: usize = 4096;
/// Cluster send-queue capacity in batches: forwards and replies of a few
/// client batches wait here for one `sendmmsg`.
const QUEUE_BATCHES: usize = 8;
/// How long to wait at start for the first DNS answer before serving alone.
const FIRST_DNS_WAIT: Duration = Duration::from_secs(5);

/// Something that arrived for the loop, its bytes copied into the caller's
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A forwarded request (`len` bytes): give it to the engine with `via`.
    Request {
        /// The forwarding member's relay index.
        via: u8,
        /// The client's address.
        client: SocketAddr,
        /// Bytes of the request in the buffer.
        len: usize,
    },
    /// A reply (`len` bytes) to send to `client` from the client socket of
    /// its family.
    Reply {
        /// The client.
        client: SocketAddr,
        /// Bytes of the reply in the buffer.
        len: usize,
    },
}

/// A snapshot for `/metrics` and the stats line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This member's cluster address.
    pub me: Option<SocketAddr>,
    /// Live members, this one included when it is.
    pub live: usize,
    /// Every listed member but this one.
    pub members: Vec<MemberStatus>,
    /// The cluster's counters (rejections by reason).
    pub counters: ClusterCounters,
}

/// The cluster socket and its state machine, driven by a server loop.
pub struct ClusterPort {
    socket: mio::net::UdpSocket,
    recv: RecvBatch,
    /// Datagrams of the batch in hand: (next to look at, received).
    at: (usize, usize),
    readable: bool,
    cluster: Cluster,
    /// The routes as the other workers see them.
    shared: Arc<SharedRoutes>,
    resolver: Option<Resolver>,
    /// The last DNS error logged, so a lasting outage logs once.
    dns_error: Option<String>,
    drain: Duration,
    /// Receive calls that failed unexpectedly.
    recv_errors: u64,
    /// Liveness as last logged, by relay index.
    logged_live: Vec<bool>,
}

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ClusterPort {
    /// Binds the cluster socket and registers it with `registry` under
    /// `token`; with `--cluster-dns`, starts the resolver (which wakes the
    /// loop through `waker`) and waits up to 5 s for its first answer.
    /// `mono_ms` is the loop's clock now.
    pub fn bind(
        settings: &ClusterSettings,
        buffers: (usize, usize),
        batch: usize,
        registry: &Registry,
        token: Token,
        waker: Arc<Waker>,
        mono_ms: u64,
    ) -> io::Result<ClusterPort> {
        let cfg = &settings.config;
        let (std_socket, _) = sys::bind_udp(cfg.bind, buffers.0, buffers.1)?;
        let mut socket = mio::net::UdpSocket::from_std(std_socket);
        registry.register(&mut socket, token, Interest::READABLE)?;
        let now = Now {
            mono_ms,
            unix_ms: unix_ms(),
        };
        let mut cluster = Cluster::new(cfg, now);
        let mut resolver = None;
        match &cfg.members {
            MemberSource::Static(list) => {
                cluster.set_members(list, now);
            }
            MemberSource::Dns {
                name,
                port,
                interval,
            } => {
                let r = Resolver::spawn(
                    name.clone(),
                    *port,
                    cfg.bind.is_ipv6(),
                    *interval,
                    move || {
                        let _ = waker.wake();
                    },
                )?;
                match r.wait(FIRST_DNS_WAIT).map(|r| r.result) {
                    Some(Ok(list)) => {
                        let change = cluster.set_members(&list, now);
                        info!(
                            "cluster: {name} lists {} members{}",
                            list.len(),
                            if change.me_listed {
                                ""
                            } else {
                                " (not this one yet)"
                            }
                        );
                    }
                    Some(Err(e)) => warn!("cluster: {e}; serving alone until it resolves"),
                    None => {
                        warn!("cluster: no answer for {name} yet; serving alone until it resolves")
                    }
                }
                resolver = Some(r);
            }
        }
        let shared = Arc::new(SharedRoutes::new(cluster.routes()));
        Ok(ClusterPort {
            socket,
            recv: RecvBatch::new(batch),
            at: (0, 0),
            // Data may have arrived between bind and register.
            readable: true,
            cluster,
            shared,
            resolver,
            dns_error: None,
            drain: settings.drain,
            recv_errors: 0,
            logged_live: vec![false; super::MAX_PEERS + 1],
        })
    }

    /// The cluster socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// What a worker of this process needs to forward and relay: sending
    /// thread `lane` (1 and up, one per worker; 0 is the port's
    /// heartbeats), a duplicate of the cluster socket, and the shared
    /// routes. `batch` sizes its send queue.
    pub fn lane(&self, lane: u8, batch: usize) -> io::Result<ClusterLane> {
        let dup = mio::net::UdpSocket::from_std(std_socket(&self.socket)?);
        Ok(ClusterLane {
            socket: dup,
            queue: SendQueue::new(batch * QUEUE_BATCHES, batch),
            sealer: self.cluster.sealer(lane),
            routes: Arc::new(self.cluster.routes().clone()),
            shared: self.shared.clone(),
        })
    }

    /// The loop saw the socket readable.
    pub fn set_readable(&mut self) {
        self.readable = true;
    }

    /// True while datagrams may be waiting on the socket.
    pub fn readable(&self) -> bool {
        self.readable || self.at.0 < self.at.1
    }

    /// The next forwarded request or relayed reply from the cluster socket,
    /// copied into `buf`; heartbeats and refused datagrams are taken care
    /// of on the way. `None` when the socket is drained (or the budget for
    /// this turn is spent: [`ClusterPort::readable`] stays true).
    pub fn next(&mut self, now: Now, buf: &mut [u8; MAX_PAYLOAD]) -> Option<Incoming> {
        let mut budget = RECV_BUDGET;
        loop {
            while self.at.0 < self.at.1 {
                let k = self.at.0;
                self.at.0 += 1;
                let Some(d) = self.recv.get(k) else {
                    self.recv_errors += 1;
                    continue;
                };
                // A datagram longer than the buffer was cut short: not whole,
                // so the MAC cannot match; `receive` refuses it as malformed.
                let data = if d.len == d.data.len() {
                    d.data
                } else {
                    &[][..]
                };
                match self.cluster.receive(data, now) {
                    Received::Request {
                        via,
                        client,
                        request,
                    } => {
                        buf[..request.len()].copy_from_slice(request);
                        return Some(Incoming::Request {
                            via,
                            client,
                            len: request.len(),
                        });
                    }
                    Received::Reply { client, reply } => {
                        buf[..reply.len()].copy_from_slice(reply);
                        return Some(Incoming::Reply {
                            client,
                            len: reply.len(),
                        });
                    }
                    Received::Heartbeat => {}
                    Received::Rejected(why) => {
                        debug!("cluster: refused a datagram from {}: {why:?}", d.from);
                    }
                }
            }
            if !self.readable || budget == 0 {
                return None;
            }
            match self.recv.recv(&self.socket) {
                Ok(n) => {
                    self.at = (0, n);
                    budget = budget.saturating_sub(n.max(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(e) => {
                    self.recv_errors += 1;
                    debug!("cluster: receive failed: {e}");
                    self.readable = false;
                    return None;
                }
            }
        }
    }

    /// Heartbeats due, liveness, and new DNS answers. Returns when it next
    /// has work (monotonic ms).
    pub fn timers(&mut self, now: Now) -> u64 {
        if let Some(r) = self.resolver.as_ref().and_then(Resolver::latest) {
            match r.result {
                Ok(list) => {
                    let change = self.cluster.set_members(&list, now);
                    if change.added + change.removed > 0 {
                        info!(
                            "cluster: DNS lists {} members: {} new, {} gone{}",
                            list.len(),
                            change.added,
                            change.removed,
                            if change.me_listed {
                                ""
                            } else {
                                "; this member is not among them"
                            }
                        );
                    }
                    self.dns_error = None;
                }
                Err(e) => {
                    if self.dns_error.as_deref() != Some(e.as_str()) {
                        warn!("cluster: {e}; keeping the last member list");
                        self.dns_error = Some(e);
                    }
                }
            }
        }
        if self.cluster.tick(now) {
            self.log_liveness(now);
        }
        // A heartbeat or a DNS answer may have changed the routes too.
        let mut buf = [0u8; MAX_LEN];
        while let Some((to, n)) = self.cluster.poll_transmit(now, &mut buf) {
            // Heartbeats share the socket; one that cannot go is counted.
            // A heartbeat the socket cannot take now is simply one fewer:
            // the next goes out a quarter timeout later.
            if let Err(e) = self.socket.send_to(&buf[..n], to) {
                debug!("cluster: heartbeat to {to} failed: {e}");
            }
        }
        if self.shared.generation() != self.cluster.routes().generation() {
            self.shared.publish(self.cluster.routes());
        }
        self.cluster.poll_timeout(now)
    }

    fn log_liveness(&mut self, now: Now) {
        for m in self.cluster.members(now) {
            let was = &mut self.logged_live[usize::from(m.via)];
            if *was != m.live {
                if m.live {
                    info!("cluster: member {} is live", m.addr);
                } else if m.leaving {
                    info!("cluster: member {} left", m.addr);
                } else {
                    warn!(
                        "cluster: member {} is silent; its pairs move to the others",
                        m.addr
                    );
                }
                *was = m.live;
            }
        }
    }

    /// SIGTERM: tell the others this member leaves, and forward everything
    /// from now on. Returns how long to keep serving (`--cluster-drain`).
    pub fn leave(&mut self, now: Now) -> Duration {
        self.cluster.leave(now);
        info!(
            "cluster: leaving; relaying for {}",
            crate::cli::format_duration(self.drain)
        );
        self.timers(now);
        self.drain
    }

    /// The counters that belong in the server's counters: (forwarded in,
    /// refused, failed receive calls). The loops count what they forward
    /// out themselves.
    pub fn totals(&self) -> (u64, u64, u64) {
        let c = self.cluster.counters();
        (c.forwarded_in, c.rejected(), self.recv_errors)
    }

    /// `--cluster-drain`.
    pub fn drain(&self) -> Duration {
        self.drain
    }

    /// What `/metrics` and the stats line show.
    pub fn status(&self, now: Now) -> ClusterStatus {
        ClusterStatus {
            me: Some(self.cluster.me()),
            live: self.cluster.routes().live_len(),
            members: self.cluster.members(now),
            counters: self.cluster.counters(),
        }
    }
}

/// The routes a process's workers share: the worker that owns the
/// [`ClusterPort`] publishes a new snapshot when membership changes; the
/// others notice with one atomic load per batch and take it under a lock
/// held for an `Arc` clone, only then.
#[derive(Debug)]
pub struct SharedRoutes {
    generation: AtomicU64,
    routes: Mutex<Arc<Routes>>,
}

impl SharedRoutes {
    fn new(routes: &Routes) -> SharedRoutes {
        SharedRoutes {
            generation: AtomicU64::new(routes.generation()),
            routes: Mutex::new(Arc::new(routes.clone())),
        }
    }

    /// The generation published last.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn publish(&self, routes: &Routes) {
        let fresh = Arc::new(routes.clone());
        if let Ok(mut r) = self.routes.lock() {
            *r = fresh;
        }
        self.generation
            .store(routes.generation(), Ordering::Release);
    }

    /// The routes, if their generation is not `seen`.
    pub fn latest(&self, seen: u64) -> Option<Arc<Routes>> {
        if self.generation() == seen {
            return None;
        }
        self.routes.lock().ok().map(|r| r.clone())
    }
}

/// What a worker needs to send to other members: the owner choice, its own
/// sealer (lane), a send queue, and the cluster socket (a duplicate of it
/// for workers that do not own the [`ClusterPort`]).
pub struct ClusterLane {
    socket: mio::net::UdpSocket,
    queue: SendQueue,
    sealer: Sealer,
    routes: Arc<Routes>,
    shared: Arc<SharedRoutes>,
}

impl ClusterLane {
    /// Takes the newest routes if membership changed (one atomic load when
    /// it did not). Call between batches.
    #[inline]
    pub fn refresh(&mut self) {
        if let Some(r) = self.shared.latest(self.routes.generation()) {
            self.routes = r;
        }
    }

    /// Forwards made, and replies relayed.
    pub fn totals(&self) -> (u64, u64) {
        (self.sealer.forwarded, self.sealer.replies)
    }

    /// The relay index of the member that owns the pair of this client
    /// datagram, when that is another member; `None` when this member owns
    /// it or it is not a request (the loop handles it as a single server
    /// would).
    #[inline]
    pub fn owner(&self, datagram: &[u8]) -> Option<u8> {
        match self.routes.owner(pair_key(datagram)?) {
            Owner::Me => None,
            Owner::Member(via) => Some(via),
        }
    }

    /// Forwards a client's request to member `via`. False when it could not
    /// go (the socket's buffer is full: counted; the client retransmits).
    pub fn forward(&mut self, via: u8, client: SocketAddr, request: &[u8], unix_ms: u64) -> bool {
        let Some(to) = self.routes.member(via) else {
            return false;
        };
        let mut buf = [0u8; MAX_LEN];
        let Some(n) = self.sealer.forward(client, request, unix_ms, &mut buf) else {
            return false;
        };
        self.send(to, &buf[..n])
    }

    /// Sends a reply for `client` back through member `via`, which relays
    /// it. False when it could not go.
    pub fn relay(&mut self, via: u8, client: SocketAddr, reply: &[u8], unix_ms: u64) -> bool {
        let Some(to) = self.routes.member(via) else {
            return false;
        };
        let mut buf = [0u8; MAX_LEN];
        let Some(n) = self.sealer.reply(client, reply, unix_ms, &mut buf) else {
            return false;
        };
        self.send(to, &buf[..n])
    }

    fn send(&mut self, to: SocketAddr, datagram: &[u8]) -> bool {
        if datagram.len() <= SEND_SLOT_LEN {
            if self.queue.push(to, datagram) {
                return true;
            }
            // Full: make room, then try once more.
            self.flush();
            return self.queue.push(to, datagram);
        }
        match self.socket.send_to(datagram, to) {
            Ok(_) => true,
            Err(e) => {
                debug!("cluster: send to {to} failed: {e}");
                false
            }
        }
    }

    /// Sends what is queued for other members (one `sendmmsg` per batch).
    /// What the socket does not take now stays queued for the next flush;
    /// returns how many it refused with an error (and dropped).
    pub fn flush(&mut self) -> u64 {
        if self.queue.is_empty() {
            return 0;
        }
        self.queue.flush(&self.socket).errors
    }
}

/// A `std` duplicate of a mio UDP socket (the same file description, so
/// nonblocking like it): `dup(2)`.
fn std_socket(socket: &mio::net::UdpSocket) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = socket.as_fd().try_clone_to_owned()?;
    Ok(std::net::UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterKey, MemberSource};
    use std::time::Duration;

    #[test]
    fn workers_see_a_new_membership_once() {
        let cfg = ClusterConfig {
            bind: "10.0.0.2:1025".parse().unwrap(),
            members: MemberSource::Static(Vec::new()),
            timeout: Duration::from_secs(2),
            key: ClusterKey::new(&[&[1u8; 16]]).unwrap(),
        };
        let now = Now {
            mono_ms: 0,
            unix_ms: 1_700_000_000_000,
        };
        let mut cluster = Cluster::new(&cfg, now);
        let shared = SharedRoutes::new(cluster.routes());
        let g = shared.generation();
        assert!(shared.latest(g).is_none(), "nothing new");
        cluster.set_members(
            &[
                "10.0.0.2:1025".parse().unwrap(),
                "10.0.0.3:1025".parse().unwrap(),
            ],
            now,
        );
        shared.publish(cluster.routes());
        let r = shared.latest(g).expect("a new snapshot");
        assert_eq!(r.live_len(), 2);
        assert!(shared.latest(r.generation()).is_none());
    }
}
