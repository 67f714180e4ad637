//! One worker: a single-threaded `mio` loop over its sockets, with its own
//! engine, rate limiter, receive batches and send queues.
//!
//! A turn of the loop: wait for readiness or the next timer; for each
//! readable socket, receive batches until `WouldBlock` or the per-wakeup
//! budget, hand each datagram to the engine and queue its replies; flush
//! queues with `sendmmsg`; run a bounded slice of expiry; print stats when
//! due.
//!
//! Back-pressure: when a send queue cannot take another batch of replies (the
//! kernel's send buffer is full), the socket is not read until the queue
//! drains, so requests wait in the kernel rather than replies being thrown
//! away. A reply that still finds no room is counted in `send_dropped`.
//!
//! Nothing here allocates, logs or formats per packet, except `trace!` and
//! `debug!` lines that cost one level check unless `-vvv`/`-vv` asked for them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, trace, warn};
use mio::{Events, Poll, Token, Waker};

use super::gate::{Clock, Gate, Verdict};
use super::ratelimit::RateLimiter;
use super::ReloadHook;
use crate::cluster::port::{unix_ms, Incoming};
use crate::cluster::{ClusterPort, Now};
use crate::engine::{Engine, Outcome, Transmit};
use crate::metrics::{Metrics, Snapshot};
use crate::stats::{Counters, IoCounters};
use crate::sys::{self, RecvBatch, SendQueue};
use crate::wire::cluster::MAX_PAYLOAD;
use crate::wire::{stun, v2, MAX_REPLY_LEN};

/// Datagrams received per socket per wakeup before the loop looks at timers
/// and the other socket (as boringtun's MAX_ITR): fairness and bounded latency.
pub(super) const RECV_BUDGET: usize = 4096;
/// Send-queue capacity in batches: room for bursts while the kernel drains.
pub(super) const QUEUE_BATCHES: usize = 16;
/// How often expiry runs while the tables hold entries.
pub(super) const EXPIRY_TICK: Duration = Duration::from_millis(10);

pub(super) const WAKER: Token = Token(usize::MAX);
/// The cluster socket's token: below the metrics' tokens, above any endpoint.
pub(super) const CLUSTER: Token = Token(crate::metrics::TOKEN_BASE - 1);

pub(super) struct Endpoint {
    pub(super) socket: mio::net::UdpSocket,
    pub(super) local: SocketAddr,
    pub(super) recv: RecvBatch,
    pub(super) queue: SendQueue,
    /// Data may be waiting: mio is edge-triggered, so read until `WouldBlock`.
    pub(super) readable: bool,
    /// A `--stun-port` socket: answers STUN Binding requests, drops the rest.
    pub(super) stun_only: bool,
}

/// One worker: its sockets, engine, rate limiter, counters and loop.
pub(super) struct Worker {
    pub(super) poll: Poll,
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) engine: Engine,
    pub(super) limiter: Option<RateLimiter>,
    /// What happened on the sockets (the engine counts its own decisions).
    pub(super) io: IoCounters,
    /// Per datagram of the batch in hand: for the engine (passed the rate
    /// limiter and is not STUN).
    pub(super) for_engine: Box<[bool]>,
    /// Protocol v2: what the engine gets (auth, cookies; see `gate.rs`).
    pub(super) gate: Gate,
    /// The v2 requests of the batch in hand the gate admitted (capacity:
    /// one batch, so pushing never allocates).
    pub(super) v2_in: Vec<(v2::Request, SocketAddr)>,
    pub(super) metrics: Option<Metrics>,
    pub(super) batch: usize,
    pub(super) stats_interval: Option<Duration>,
    pub(super) start: Instant,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) reload: Arc<AtomicBool>,
    pub(super) report: Arc<AtomicBool>,
    pub(super) reload_hooks: Vec<ReloadHook>,
    pub(super) waker: Arc<Waker>,
    /// When the oldest metrics connection must be closed.
    pub(super) metrics_deadline: Option<Instant>,
    /// Cluster mode: the cluster socket and membership.
    pub(super) cluster: Option<ClusterPort>,
}

impl Worker {
    pub(super) fn snapshot(&mut self) -> Snapshot {
        Snapshot {
            counters: self.counters(),
            capacity: self.engine.capacity(),
            replay_entries: self.engine.replay_entries(),
            wait: *self.engine.wait(),
            uptime: self.start.elapsed().as_secs_f64(),
            udp_sockets: self.endpoints.len(),
            stopping: self.stop.load(Ordering::Acquire),
            cluster: self.cluster.as_ref().map(|c| c.status(self.cluster_now())),
        }
    }

    fn cluster_now(&self) -> Now {
        Now {
            mono_ms: self.now_ms(),
            unix_ms: unix_ms(),
        }
    }

    /// Acts on the reload and report flags; called by the loop between batches.
    pub(super) fn control(&mut self) {
        if self.report.swap(false, Ordering::AcqRel) {
            let counters = self.counters();
            info!(target: crate::cli::REPORT_TARGET, "counters {counters}");
        }
        if self.reload.swap(false, Ordering::AcqRel) {
            let keys = self.gate.reload();
            match &keys {
                Some(Ok(what)) => info!(target: crate::cli::REPORT_TARGET, "reload: {what}"),
                Some(Err(why)) => warn!("reload failed, keeping the old auth keys: {why}"),
                None => {}
            }
            if self.reload_hooks.is_empty() && keys.is_none() {
                info!(target: crate::cli::REPORT_TARGET, "reload: nothing to reload");
            }
            for hook in &mut self.reload_hooks {
                match hook(&mut self.engine) {
                    Ok(what) => info!(target: crate::cli::REPORT_TARGET, "reload: {what}"),
                    Err(why) => warn!("reload failed, keeping the old state: {why}"),
                }
            }
        }
    }

    /// The counters now, gauges included.
    pub(super) fn counters(&mut self) -> Counters {
        let mut io = self.io;
        io.kernel_drops = self
            .endpoints
            .iter()
            .map(|e| sys::socket_drops(&e.socket).unwrap_or(0))
            .sum();
        if let Some(c) = self.cluster.as_ref() {
            (io.forwarded_in, io.forward_rejected) = c.totals();
        }
        Counters::new(self.engine.counters(), io)
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs until [`ShutdownHandle::shutdown`]; returns the final counters.
    pub(super) fn run(&mut self) -> io::Result<Counters> {
        let mut events = Events::with_capacity(64);
        let mut next_stats = self.stats_interval.map(|d| Instant::now() + d);
        let mut next_expiry = Instant::now();
        let mut expiry_owed = false;
        // Cluster mode: when the next heartbeat or liveness check is due
        // (loop ms), and after SIGTERM, when the drain ends.
        let mut cluster_due: Option<u64> = None;
        let mut drain_until: Option<u64> = None;
        loop {
            let now = Instant::now();
            let cluster_ready = self.cluster.as_ref().is_some_and(|c| c.readable());
            let timeout = if cluster_ready
                || self
                    .endpoints
                    .iter()
                    .any(|e| e.readable && can_read(e, self.batch))
            {
                Some(Duration::ZERO)
            } else {
                let mut t = next_stats.map(|s| s.saturating_duration_since(now));
                if let Some(due) = cluster_due {
                    let c = Duration::from_millis(due.saturating_sub(self.now_ms()));
                    t = Some(t.map_or(c, |t| t.min(c)));
                }
                if expiry_owed {
                    t = Some(Duration::from_millis(1));
                } else if self.engine.pending() + self.engine.replay_entries() > 0 {
                    let e = next_expiry.saturating_duration_since(now);
                    t = Some(t.map_or(e, |t| t.min(e)));
                }
                if let Some(d) = self.metrics_deadline {
                    let m = d.saturating_duration_since(now);
                    t = Some(t.map_or(m, |t| t.min(m)));
                }
                t
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                let token = event.token();
                if Metrics::owns(token) {
                    let snapshot = self.snapshot();
                    if let Some(m) = self.metrics.as_mut() {
                        m.ready(self.poll.registry(), token, Instant::now(), &snapshot);
                        // A new connection brings a deadline the poll must wake for.
                        self.metrics_deadline = m.next_deadline();
                    }
                } else if token == CLUSTER {
                    if let Some(c) = self.cluster.as_mut() {
                        c.set_readable();
                    }
                } else if let Some(ep) = self.endpoints.get_mut(token.0) {
                    if event.is_readable() {
                        ep.readable = true;
                    }
                }
            }
            let now_ms = self.now_ms();
            for i in 0..self.endpoints.len() {
                self.service(i, now_ms);
            }
            if self.cluster.is_some() {
                self.service_cluster(now_ms);
                let now = self.cluster_now();
                if let Some(c) = self.cluster.as_mut() {
                    cluster_due = Some(c.timers(now));
                }
            }
            if self.stop.load(Ordering::Acquire) {
                // A member first tells the others it leaves, and keeps
                // relaying for --cluster-drain; a single server stops now.
                let now = self.cluster_now();
                match (self.cluster.as_mut(), drain_until) {
                    (Some(c), None) => {
                        let drain = c.leave(now);
                        drain_until = Some(now.mono_ms + drain.as_millis() as u64);
                        cluster_due = Some(now.mono_ms);
                    }
                    (Some(_), Some(end)) if now.mono_ms < end => {
                        cluster_due = Some(cluster_due.map_or(end, |d| d.min(end)));
                    }
                    _ => break,
                }
            }
            self.control();
            let now = Instant::now();
            if now >= next_expiry || expiry_owed {
                expiry_owed = self.engine.expire(self.now_ms());
                next_expiry = now + EXPIRY_TICK;
                if let Some(m) = self.metrics.as_mut() {
                    self.metrics_deadline = m.expire(self.poll.registry(), now);
                }
            }
            if let Some(due) = next_stats {
                if now >= due {
                    let cluster = self.cluster_line();
                    info!("stats {}{cluster}", self.counters());
                    next_stats = self.stats_interval.map(|d| now + d);
                }
            }
        }
        // Last chance for queued replies; what cannot go now is counted.
        for ep in &mut self.endpoints {
            let done = ep.queue.flush(&ep.socket);
            self.io.sent += done.sent;
            self.io.send_errors += done.errors;
            self.io.send_dropped += ep.queue.len() as u64;
        }
        Ok(self.counters())
    }

    /// Reads, handles and answers on endpoint `i` until `WouldBlock`, the
    /// budget, or a full send queue.
    fn service(&mut self, i: usize, now_ms: u64) {
        let batch = self.batch;
        let Worker {
            endpoints,
            engine,
            limiter,
            io,
            for_engine,
            gate,
            v2_in,
            cluster,
            ..
        } = self;
        let unix = if cluster.is_some() { unix_ms() } else { 0 };
        let ep = &mut endpoints[i];
        flush(ep, io);
        let mut budget = RECV_BUDGET;
        while ep.readable && budget > 0 && can_read(ep, batch) {
            let n = match ep.recv.recv(&ep.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ep.readable = false;
                    break;
                }
                Err(e) => {
                    // Not expected on an unconnected UDP socket; count it and
                    // yield to the poller rather than spin on it.
                    io.recv_errors += 1;
                    debug!("{}: receive failed: {e}", ep.local);
                    ep.readable = false;
                    break;
                }
            };
            budget = budget.saturating_sub(n.max(1));
            let Endpoint {
                recv,
                queue,
                local,
                stun_only,
                ..
            } = ep;
            // The rate limiter first, in two passes like the engine: fetch
            // every source's bucket, then decide. STUN is answered here.
            if let Some(l) = limiter.as_ref() {
                for k in 0..n {
                    if let Some(d) = recv.get(k) {
                        l.prefetch(d.from.ip());
                    }
                }
            }
            // The wall clock for tokens and cookies, once per batch.
            let clock = Clock {
                unix_secs: Clock::unix_now(),
                millis: now_ms as u32,
            };
            for (k, ok) in for_engine.iter_mut().enumerate().take(n) {
                *ok = false;
                let Some(d) = recv.get(k) else {
                    io.recv_errors += 1;
                    continue;
                };
                let within_rate = limiter
                    .as_mut()
                    .map_or(true, |l| l.allow(d.from.ip(), now_ms as u32));
                if *stun_only || stun::is_stun(d.data) {
                    if within_rate {
                        answer_stun(queue, io, d);
                    } else {
                        io.rate_limited += 1;
                    }
                    continue;
                }
                match gate.admit(d.data, d.from, within_rate, clock, io) {
                    // Cluster: an admitted request whose pair another member
                    // owns goes there.
                    Verdict::Engine | Verdict::V2(_)
                        if forward(cluster, io, d.data, d.from, unix) => {}
                    Verdict::Engine => *ok = true,
                    Verdict::V2(req) => v2_in.push((req, d.from)),
                    Verdict::Cookie(c) => queue_bytes(queue, io, d.from, &c.to_bytes()),
                    Verdict::Drop => {}
                }
            }
            let for_engine = &*for_engine;
            engine.handle_batch(
                n,
                |k| {
                    if for_engine[k] {
                        recv.get(k).map(|d| (d.data, d.from))
                    } else {
                        None
                    }
                },
                now_ms,
                |k, outcome| {
                    trace!("{local}: datagram {k} of the batch: {outcome:?}");
                    match outcome {
                        Outcome::Matched {
                            waiting,
                            completing,
                        } => {
                            debug!(
                                "matched {} <-> {} ports {}/{}",
                                waiting.to,
                                completing.to,
                                waiting.reply.src_port,
                                waiting.reply.dst_port
                            );
                            send_reply(queue, io, cluster, waiting, unix);
                            send_reply(queue, io, cluster, completing, unix);
                        }
                        Outcome::Replayed(t) => send_reply(queue, io, cluster, t, unix),
                        _ => {}
                    }
                },
            );
            let admitted = &*v2_in;
            engine.handle_batch_v2(
                admitted.len(),
                |k| admitted.get(k).map(|(req, from)| (req, *from)),
                now_ms,
                |k, outcome| {
                    trace!("{local}: v2 request {k} of the batch: {outcome:?}");
                    match outcome {
                        Outcome::Matched {
                            waiting,
                            completing,
                        } => {
                            debug!("matched v2 {} <-> {}", waiting.to, completing.to);
                            send_v2(queue, io, cluster, waiting, unix);
                            send_v2(queue, io, cluster, completing, unix);
                        }
                        Outcome::Replayed(t) => send_v2(queue, io, cluster, t, unix),
                        _ => {}
                    }
                },
            );
            v2_in.clear();
            if ep.queue.len() >= batch {
                flush(ep, io);
            }
            if let Some(port) = cluster.as_mut() {
                port.flush();
            }
        }
        flush(ep, io);
    }
}

impl Worker {
    /// Cluster mode: hands forwarded requests to the engine and relayed
    /// replies to their clients, until the cluster socket is drained.
    fn service_cluster(&mut self, now_ms: u64) {
        let now = self.cluster_now();
        let self_batch = self.batch;
        let Worker {
            endpoints,
            engine,
            io,
            cluster,
            ..
        } = self;
        let mut buf = [0u8; MAX_PAYLOAD];
        while let Some(incoming) = cluster.as_mut().and_then(|c| c.next(now, &mut buf)) {
            match incoming {
                Incoming::Request { via, client, len } if len == v2::REQUEST_LEN => {
                    // The member the client reached admitted it (token,
                    // cookie, --require-auth); the cluster MAC vouches for that.
                    let Ok(req) = v2::Request::parse(&buf[..len]) else {
                        io.v2_malformed += 1;
                        continue;
                    };
                    let outcome = engine.handle_relayed_v2(&req, client, via, now_ms);
                    trace!("cluster: v2 forwarded from member {via}: {outcome:?}");
                    let Some(ep) = client_endpoint(endpoints, client) else {
                        continue;
                    };
                    match &outcome {
                        Outcome::Matched {
                            waiting,
                            completing,
                        } => {
                            send_v2(&mut ep.queue, io, cluster, waiting, now.unix_ms);
                            send_v2(&mut ep.queue, io, cluster, completing, now.unix_ms);
                        }
                        Outcome::Replayed(t) => send_v2(&mut ep.queue, io, cluster, t, now.unix_ms),
                        _ => {}
                    }
                }
                Incoming::Request { via, client, len } => {
                    let outcome = engine.handle_relayed(&buf[..len], client, via, now_ms);
                    trace!("cluster: forwarded from member {via}: {outcome:?}");
                    let Some(ep) = client_endpoint(endpoints, client) else {
                        continue;
                    };
                    match &outcome {
                        Outcome::Matched {
                            waiting,
                            completing,
                        } => {
                            send_reply(&mut ep.queue, io, cluster, waiting, now.unix_ms);
                            send_reply(&mut ep.queue, io, cluster, completing, now.unix_ms);
                        }
                        Outcome::Replayed(t) => {
                            send_reply(&mut ep.queue, io, cluster, t, now.unix_ms)
                        }
                        _ => {}
                    }
                }
                Incoming::Reply { client, len } => {
                    let queued = client_endpoint(endpoints, client)
                        .is_some_and(|ep| ep.queue.push(client, &buf[..len]));
                    if !queued {
                        io.send_dropped += 1;
                    }
                }
            }
            // Send in batches, before a queue can fill up.
            for ep in endpoints.iter_mut() {
                if ep.queue.len() >= self_batch {
                    flush(ep, io);
                }
            }
        }
        for ep in endpoints.iter_mut() {
            flush(ep, io);
        }
        if let Some(port) = cluster.as_mut() {
            port.flush();
        }
    }

    /// The cluster's part of the stats line: live members and how long ago
    /// each was heard from.
    fn cluster_line(&self) -> String {
        let Some(c) = self.cluster.as_ref() else {
            return String::new();
        };
        let s = c.status(self.cluster_now());
        let mut line = format!(" cluster_live={}", s.live);
        for m in &s.members {
            let age = m.heard_ms_ago.map_or("never".to_string(), |ms| {
                format!("{:.1}s", ms as f64 / 1000.0)
            });
            line.push_str(&format!(
                " member={}:{}:{}",
                m.addr,
                if m.live { "live" } else { "down" },
                age
            ));
        }
        line
    }
}

/// The client socket of `client`'s family (never a `--stun-port` one).
fn client_endpoint(endpoints: &mut [Endpoint], client: SocketAddr) -> Option<&mut Endpoint> {
    endpoints
        .iter_mut()
        .find(|e| !e.stun_only && e.local.is_ipv4() == client.is_ipv4())
}

/// Cluster mode: forwards an admitted request whose pair another member
/// owns, and says whether it did (the request is then done here).
fn forward(
    cluster: &mut Option<ClusterPort>,
    io: &mut IoCounters,
    request: &[u8],
    from: SocketAddr,
    unix_ms: u64,
) -> bool {
    let Some(port) = cluster.as_mut() else {
        return false;
    };
    let Some(via) = port.owner(request) else {
        return false;
    };
    io.forwarded_out += 1;
    port.forward(via, from, request, unix_ms);
    true
}

/// [`send_reply`] for a v2 reply.
fn send_v2(
    queue: &mut SendQueue,
    io: &mut IoCounters,
    cluster: &mut Option<ClusterPort>,
    t: &Transmit<v2::Reply>,
    unix_ms: u64,
) {
    let bytes = t.reply.to_bytes();
    if let (true, Some(port)) = (t.via != 0, cluster.as_mut()) {
        if port.relay(t.via, t.to, &bytes, unix_ms) {
            io.sent += 1;
        } else {
            io.send_dropped += 1;
        }
        return;
    }
    queue_bytes(queue, io, t.to, &bytes);
}

/// Sends an engine reply: to the client from this member, or, when its
/// request came through another member (`via` > 0), back to that member.
fn send_reply(
    queue: &mut SendQueue,
    io: &mut IoCounters,
    cluster: &mut Option<ClusterPort>,
    t: &Transmit,
    unix_ms: u64,
) {
    if let (true, Some(port)) = (t.via != 0, cluster.as_mut()) {
        let mut buf = [0u8; MAX_REPLY_LEN];
        let len = t.reply.emit(&mut buf);
        if port.relay(t.via, t.to, &buf[..len], unix_ms) {
            io.sent += 1;
        } else {
            io.send_dropped += 1;
        }
        return;
    }
    queue_reply(queue, io, t);
}

/// True when the queue has room for the replies of one more full batch
/// (at most two per request).
fn can_read(ep: &Endpoint, batch: usize) -> bool {
    ep.queue.free() >= 2 * batch
}

fn queue_reply(queue: &mut SendQueue, io: &mut IoCounters, t: &Transmit) {
    let mut buf = [0u8; MAX_REPLY_LEN];
    let len = t.reply.emit(&mut buf);
    if !queue.push(t.to, &buf[..len]) {
        io.send_dropped += 1;
    }
}

/// Queues a datagram already encoded (v2 replies and cookie replies).
fn queue_bytes(queue: &mut SendQueue, io: &mut IoCounters, to: SocketAddr, bytes: &[u8]) {
    if !queue.push(to, bytes) {
        io.send_dropped += 1;
    }
}

/// Queues the answer to a STUN Binding request, or counts the refusal. The
/// per-source rate limit has already run.
fn answer_stun(queue: &mut SendQueue, io: &mut IoCounters, d: sys::Datagram<'_>) {
    let mut buf = [0u8; stun::MAX_ANSWER_LEN];
    // A datagram longer than the receive buffer was cut short: never answer
    // what could not be read whole.
    let answered = if d.len == d.data.len() {
        stun::answer(d.data, d.from, &mut buf)
    } else {
        Err(stun::Refusal::Malformed)
    };
    match answered {
        Ok(len) => {
            io.stun_answered += 1;
            if !queue.push(d.from, &buf[..len]) {
                io.send_dropped += 1;
            }
        }
        Err(_) => io.stun_refused += 1,
    }
}

fn flush(ep: &mut Endpoint, io: &mut IoCounters) {
    if ep.queue.is_empty() {
        return;
    }
    let done = ep.queue.flush(&ep.socket);
    io.sent += done.sent;
    io.send_errors += done.errors;
}
