//! One worker: a single-threaded `mio` loop over its sockets (one of each
//! `SO_REUSEPORT` group: a main socket per address family, and the
//! `--stun-port` ones), with its own engine, rate limiter, receive batches,
//! send queues and counters. Workers share nothing on the packet path.
//!
//! A turn of the loop: wait for readiness or the next timer; for each
//! readable socket, receive batches until `WouldBlock`, the per-wakeup budget
//! or a full send queue; rate limit, answer STUN, hand the rest to the engine
//! and queue its replies; flush queues with `sendmmsg`; then, between
//! batches, act on the control thread's messages (limit shares, reloads),
//! run a bounded slice of expiry, and publish a copy of the counters for the
//! control and metrics threads.
//!
//! Back-pressure: when a send queue cannot take another batch of replies (the
//! kernel's send buffer is full), the socket is not read until the queue
//! drains, so requests wait in the kernel rather than replies being thrown
//! away. A reply that still finds no room is counted in `send_dropped`.
//!
//! Where other traffic joins the loop: [`Worker::service`] is the one place a
//! datagram is judged before the engine: rate limit, then STUN, then the
//! admission gate (`gate.rs`: seed or v2, `--require-auth`, cookies, and the
//! batch's v2 tokens checked together), then the engine; a cluster socket
//! would be one more [`Endpoint`] kind whose datagrams carry the relay byte
//! that `engine::Transmit::via` names.
//!
//! Nothing here allocates, logs or formats per packet, except `trace!` and
//! `debug!` lines that cost one level check unless `-vvv`/`-vv` asked for them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, trace};
use mio::{Events, Interest, Poll, Token, Waker};

use super::gate::{Clock, Gate, Verdict};
use super::ratelimit::{self, RateLimiter};
use super::shares::{Limited, Measure, NoteFilter, Order, Share};
use super::steering::Steering;
use super::{Control, Event, ReloadTarget, Shared, WorkerState};
use crate::cluster::port::{unix_ms, Incoming};
use crate::cluster::{ClusterLane, ClusterPort, Now};
use crate::engine::source::{prefixes, Level, SourceLimits};
use crate::engine::{DropReason, Engine, Outcome, Transmit};
use crate::stats::{Counters, IoCounters};
use crate::sys::{self, RecvBatch, SendQueue};
use crate::wire::cluster::MAX_PAYLOAD;
use crate::wire::{stun, v2, MAX_REPLY_LEN};

/// Datagrams received per socket per wakeup before the loop looks at timers
/// and the other socket (as boringtun's MAX_ITR): fairness and bounded latency.
const RECV_BUDGET: usize = 4096;
/// Send-queue capacity in batches: room for bursts while the kernel drains.
pub(super) const QUEUE_BATCHES: usize = 16;
/// How often expiry runs while the tables hold entries, in ms.
const EXPIRY_TICK_MS: u64 = 10;
/// After activity, the counters are published at most this often (ms): the
/// metrics page is at most this stale while datagrams flow, and exact once
/// they stop.
const PUBLISH_EVERY_MS: u64 = 10;
/// An idle worker still turns its loop and publishes this often (ms), so
/// that `/healthz` can tell an idle worker from a stuck one.
const HEARTBEAT_MS: u64 = 1000;
/// Share refusals remembered per batch for want notes; more in one batch
/// are left for the next (the client retransmits).
pub(super) const NOTES_PER_BATCH: usize = 16;

pub(super) const WAKER: Token = Token(usize::MAX);
/// The cluster socket's token, above any endpoint's.
pub(super) const CLUSTER: Token = Token(usize::MAX - 1);

/// A forwarded request the worker that owns the cluster socket hands to the
/// worker that owns its pair (cluster mode with several workers).
pub(super) struct Relayed {
    via: u8,
    client: SocketAddr,
    len: usize,
    bytes: [u8; MAX_PAYLOAD],
}

/// Room in each worker's queue of handed-over requests: a few batches;
/// a request that finds it full is dropped and counted (`send_dropped`), and
/// its client retransmits.
pub(super) const HANDOFF_QUEUE: usize = 1024;

/// Cluster mode: what a worker uses besides its engine and sockets.
pub(super) struct ClusterParts {
    /// Every worker: its lane to send forwards and relayed replies.
    pub(super) lane: ClusterLane,
    /// Worker 0 with several workers: where to hand each forwarded request
    /// (by the steering program's twin), and the queues to the others.
    pub(super) steering: Option<Steering>,
    pub(super) handoff: Vec<Option<(SyncSender<Relayed>, Arc<Waker>)>>,
    /// The other workers: the requests worker 0 hands over.
    pub(super) inbox: Option<Receiver<Relayed>>,
    /// `--cluster-drain`.
    pub(super) drain: Duration,
}

/// What a socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// The rendezvous port: requests and STUN.
    Main,
    /// A `--stun-port` socket: answers STUN Binding requests, drops the rest.
    Stun,
}

pub(super) struct Endpoint {
    pub(super) socket: mio::net::UdpSocket,
    pub(super) local: SocketAddr,
    pub(super) recv: RecvBatch,
    pub(super) queue: SendQueue,
    /// Data may be waiting: mio is edge-triggered, so read until `WouldBlock`.
    pub(super) readable: bool,
    /// Registered for writability too: only while replies wait for room in
    /// the kernel's send buffer. (On loopback every reply the receiver
    /// consumes would otherwise report room, and wake the loop for nothing.)
    pub(super) watch_writable: bool,
    pub(super) kind: Kind,
}

/// A worker's link to the control thread.
pub(super) struct Link {
    /// Orders and reloads from the control thread.
    pub(super) control: Receiver<Control>,
    /// Want notes and measures to it (bounded; never blocks).
    pub(super) events: SyncSender<Event>,
    /// Flags, and where this worker publishes its counters.
    pub(super) shared: Arc<Shared>,
}

/// One worker: its sockets, engine, rate limiter, counters and loop.
pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) poll: Poll,
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) engine: Engine,
    pub(super) limiter: Option<RateLimiter>,
    /// The pending limits for the whole server (the engine enforces this
    /// worker's share of them).
    pub(super) whole_pending: SourceLimits,
    /// More than one worker: refusals may be a share's, not the source's.
    pub(super) shared_limits: bool,
    /// What happened on the sockets (the engine counts its own decisions).
    pub(super) io: IoCounters,
    /// Per datagram of the batch in hand: its source if it is for the
    /// engine (passed the rate limiter and the gate, and is not STUN), so
    /// that the engine's pass reads the address the first pass parsed.
    pub(super) for_engine: Box<[Option<SocketAddr>]>,
    /// Protocol v2: what the engine gets (auth, cookies; see `gate.rs`).
    pub(super) gate: Gate,
    /// The v2 requests of the batch in hand the gate admitted (capacity:
    /// one batch, so pushing never allocates).
    pub(super) v2_in: Vec<(v2::Request, SocketAddr)>,
    /// Cluster mode: worker 0's cluster socket and membership.
    pub(super) cluster: Option<ClusterPort>,
    /// Cluster mode: this worker's lane, hand-over queues and drain.
    pub(super) cparts: Option<ClusterParts>,
    /// Share refusals of the batch in hand, and the notes they may become.
    pub(super) notes: Vec<Limited>,
    pub(super) refused: Vec<(Option<SocketAddr>, Level)>,
    pub(super) note_filter: NoteFilter,
    pub(super) batch: usize,
    /// [`sys::monotonic_ms`] at the server's start (`Shared::start`): the
    /// loop's milliseconds are the clock's minus this.
    pub(super) mono_base: u64,
    pub(super) link: Link,
    /// Publications so far.
    pub(super) generation: u64,
}

impl Worker {
    /// The loop's milliseconds since the server started: one clock read,
    /// without `Instant`'s subtraction and division.
    fn now_ms(&self) -> u64 {
        sys::monotonic_ms().saturating_sub(self.mono_base)
    }

    fn cluster_now(&self) -> Now {
        Now {
            mono_ms: self.now_ms(),
            unix_ms: unix_ms(),
        }
    }

    /// The counters now, gauges included.
    fn counters(&self) -> Counters {
        let mut io = self.io;
        io.kernel_drops = self
            .endpoints
            .iter()
            .map(|e| sys::socket_drops(&e.socket).unwrap_or(0))
            .sum();
        if let Some(c) = self.cluster.as_ref() {
            let (forwarded_in, rejected, recv_errors) = c.totals();
            io.forwarded_in = forwarded_in;
            io.forward_rejected = rejected;
            io.recv_errors += recv_errors;
        }
        Counters::new(self.engine.counters(), io)
    }

    /// Copies the counters where the control and metrics threads read them.
    fn publish(&mut self, now: Instant) {
        self.generation += 1;
        let state = WorkerState {
            generation: self.generation,
            counters: self.counters(),
            wait: *self.engine.wait(),
            capacity: self.engine.capacity(),
            replay_entries: self.engine.replay_entries(),
            turned: Some(now),
            cluster: self.cluster.as_ref().map(|c| c.status(self.cluster_now())),
        };
        // A poisoned lock means a reader panicked mid-copy; the data is
        // plain numbers, so write on.
        let mut slot = self.link.shared.states[self.index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *slot = state;
    }

    /// Asks for writable events on exactly the sockets whose replies wait
    /// for room.
    fn watch_writable(&mut self) -> io::Result<()> {
        for (i, ep) in self.endpoints.iter_mut().enumerate() {
            let waiting = !ep.queue.is_empty();
            if waiting != ep.watch_writable {
                let interest = if waiting {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                self.poll
                    .registry()
                    .reregister(&mut ep.socket, Token(i), interest)?;
                ep.watch_writable = waiting;
            }
        }
        Ok(())
    }

    /// Acts on the control thread's messages; called between batches.
    /// True when there were any.
    fn control(&mut self, now_ms: u64) -> bool {
        let mut any = false;
        loop {
            let msg = match self.link.control.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return any,
            };
            any = true;
            match msg {
                Control::Order(Order::Measure { round, what }) => {
                    let value = self.measure(what, now_ms);
                    // Dropped if the channel is full: the round then times
                    // out and the prefix goes back to the default shares.
                    let _ = self.link.events.try_send(Event::Measured {
                        worker: self.index,
                        round,
                        what,
                        value,
                    });
                }
                Control::Order(Order::Set { what, share }) => self.set_share(what, share),
                Control::Reload(apply) => {
                    apply(&mut ReloadTarget {
                        engine: &mut self.engine,
                        gate: &mut self.gate,
                        worker: self.index,
                    });
                    // Publishing tells the control thread it is in force.
                    self.publish(Instant::now());
                }
                Control::Publish => self.publish(Instant::now()),
            }
        }
    }

    /// Measures `what` for a round; a pending share is frozen at what is
    /// held, so that nothing grows while the round is out.
    fn measure(&mut self, what: Limited, now_ms: u64) -> Measure {
        match what {
            Limited::Pending(p) => {
                let held = self.engine.source_held(p);
                let frozen = self.engine.source_limit(p).map_or(held, |l| l.min(held));
                self.engine.set_source_limit(p, Some(frozen));
                Measure::Held(held)
            }
            Limited::Rate(p) => Measure::Demand(match self.limiter.as_mut() {
                Some(l) => l.measure(p, now_ms as u32),
                None => ratelimit::Demand::default(),
            }),
        }
    }

    fn set_share(&mut self, what: Limited, share: Option<Share>) {
        match (what, share) {
            (Limited::Pending(p), None) => {
                self.engine.set_source_limit(p, None);
            }
            (Limited::Pending(p), Some(Share::Pending(n))) => {
                self.engine.set_source_limit(p, Some(n));
            }
            (Limited::Rate(p), None) => {
                if let Some(l) = self.limiter.as_mut() {
                    l.set_share(p, None);
                }
            }
            (Limited::Rate(p), Some(Share::Rate(r))) => {
                if let Some(l) = self.limiter.as_mut() {
                    l.set_share(p, Some(r));
                }
            }
            // A share of the other kind: not sent by the coordinator.
            _ => {}
        }
    }

    /// Turns the batch's share refusals into want notes and sends them
    /// (never blocking: a full channel drops them).
    fn send_notes(&mut self, now_ms: u64) {
        for what in self.notes.drain(..) {
            if self.note_filter.admit(what, now_ms) {
                let _ = self.link.events.try_send(Event::Want {
                    worker: self.index,
                    what,
                });
            }
        }
    }

    /// Runs until the server stops; returns the final counters. Never
    /// inlined, so that profiles show the loop under its own name.
    #[inline(never)]
    pub(super) fn run(&mut self) -> io::Result<Counters> {
        let mut events = Events::with_capacity(64);
        // The clock is read twice a turn, in the loop's milliseconds: when
        // the poll returns (`now_ms`, for the batches), and after the
        // batches (`now`, for expiry and publishing, and for the next
        // turn's timeout). Every deadline below is in those milliseconds.
        let mut now = self.now_ms();
        let mut next_expiry = now;
        let mut expiry_owed = false;
        let mut dirty = true;
        // When the counters are published next if anything changed, and at
        // the latest.
        let mut publish_due = now + PUBLISH_EVERY_MS;
        let mut heartbeat_due = now + HEARTBEAT_MS;
        // Cluster mode: when the next heartbeat or liveness check is due
        // (loop ms), and after SIGTERM, when the drain ends.
        let mut cluster_due: Option<u64> = None;
        let mut drain_until: Option<u64> = None;
        self.publish(Instant::now());
        loop {
            let cluster_ready = self.cluster.as_ref().is_some_and(|c| c.readable());
            let timeout = if cluster_ready
                || self
                    .endpoints
                    .iter()
                    .any(|e| e.readable && can_read(e, self.batch))
            {
                Some(Duration::ZERO)
            } else {
                // The earliest deadline, then one subtraction.
                let mut due = heartbeat_due;
                if dirty {
                    due = due.min(publish_due);
                }
                if !expiry_owed && self.engine.pending() + self.engine.replay_entries() > 0 {
                    due = due.min(next_expiry);
                }
                if expiry_owed {
                    due = due.min(now + 1);
                }
                if let Some(c) = cluster_due {
                    due = due.min(c);
                }
                let t = Duration::from_millis(due.saturating_sub(now));
                Some(t)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    now = self.now_ms();
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                let token = event.token();
                if token == CLUSTER {
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
            if let Some(c) = self.cparts.as_mut() {
                // Membership changed? One atomic load when it did not.
                c.lane.refresh();
            }
            for i in 0..self.endpoints.len() {
                dirty |= self.service(i, now_ms);
            }
            self.watch_writable()?;
            if self.cluster.is_some() {
                self.service_cluster();
                let now = self.cluster_now();
                if let Some(c) = self.cluster.as_mut() {
                    cluster_due = Some(c.timers(now));
                }
                dirty = true;
            }
            dirty |= self.service_inbox(now_ms);
            if self.link.shared.stop.load(Ordering::Acquire) {
                // A member first tells the others it leaves (worker 0), and
                // every worker keeps serving, now forwarding everything, for
                // --cluster-drain; a single server stops now.
                let now = self.cluster_now();
                let drain = self.cparts.as_ref().map(|c| c.drain);
                match (drain, drain_until) {
                    (Some(drain), None) => {
                        if let Some(c) = self.cluster.as_mut() {
                            c.leave(now);
                        }
                        let end = now.mono_ms + drain.as_millis() as u64;
                        drain_until = Some(end);
                        cluster_due = Some(cluster_due.map_or(end, |d| d.min(end)));
                    }
                    (Some(_), Some(end)) if now.mono_ms < end => {
                        cluster_due = Some(cluster_due.map_or(end, |d| d.min(end)));
                    }
                    _ => break,
                }
            }
            dirty |= self.control(now_ms);
            now = self.now_ms();
            if now >= next_expiry || expiry_owed {
                let before = (self.engine.pending(), self.engine.replay_entries());
                expiry_owed = self.engine.expire(now);
                next_expiry = now + EXPIRY_TICK_MS;
                dirty |= before != (self.engine.pending(), self.engine.replay_entries());
            }
            if (dirty && now >= publish_due) || now >= heartbeat_due {
                self.publish(Instant::now());
                publish_due = now + PUBLISH_EVERY_MS;
                heartbeat_due = now + HEARTBEAT_MS;
                dirty = false;
            }
        }
        // Last chance for queued replies; what cannot go now is counted.
        for ep in &mut self.endpoints {
            let done = ep.queue.flush(&ep.socket);
            self.io.sent += done.sent;
            self.io.send_errors += done.errors;
            self.io.send_dropped += ep.queue.len() as u64;
        }
        self.publish(Instant::now());
        Ok(self.counters())
    }

    /// Reads, handles and answers on endpoint `i` until `WouldBlock`, the
    /// budget, or a full send queue. True when it handled any datagram.
    fn service(&mut self, i: usize, now_ms: u64) -> bool {
        let batch = self.batch;
        let mut handled = false;
        let Worker {
            endpoints,
            engine,
            limiter,
            io,
            for_engine,
            notes,
            refused,
            shared_limits,
            whole_pending,
            gate,
            v2_in,
            cparts,
            ..
        } = self;
        let unix = if cparts.is_some() { unix_ms() } else { 0 };
        let (shared_limits, whole) = (*shared_limits, *whole_pending);
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
            handled = true;
            budget = budget.saturating_sub(n.max(1));
            // A short batch found the queue empty (recvmmsg, like the
            // fallback, stops only there): the next datagram raises a new
            // edge, so the socket need not be read again until then. This
            // saves a receive call that would only say `WouldBlock`.
            if n < batch {
                ep.readable = false;
            }
            let Endpoint {
                recv,
                queue,
                local,
                kind,
                ..
            } = ep;
            // The wall clock for tokens and cookies: read at most once per
            // batch, and only for a datagram the gate needs it for (v2).
            let mut wall: Option<u64> = None;
            // The rate limiter first, in two passes like the engine: fetch
            // every source's bucket, then decide. STUN is answered here.
            if let Some(l) = limiter.as_ref() {
                for k in 0..n {
                    if let Some(d) = recv.get(k) {
                        l.prefetch(d.from.ip());
                    }
                }
            }
            for (k, to_engine) in for_engine.iter_mut().enumerate().take(n) {
                *to_engine = None;
                let Some(d) = recv.get(k) else {
                    io.recv_errors += 1;
                    continue;
                };
                let within_rate = match limiter.as_mut() {
                    None => true,
                    Some(l) => {
                        let within = l.allow(d.from.ip(), now_ms as u32);
                        // Refused by this worker's share, maybe not by the
                        // source's whole limit: ask for more, after the batch.
                        if !within
                            && shared_limits
                            && notes.len() < NOTES_PER_BATCH
                            && l.share_limited(d.from.ip())
                        {
                            notes.push(Limited::Rate(ratelimit::source(d.from.ip())));
                        }
                        within
                    }
                };
                if *kind == Kind::Stun || stun::is_stun(d.data) {
                    if within_rate {
                        answer_stun(queue, io, d);
                    } else {
                        io.rate_limited += 1;
                    }
                    continue;
                }
                let clock = Clock {
                    unix_secs: if Gate::takes_v2_steps(d.data) {
                        *wall.get_or_insert_with(Clock::unix_now)
                    } else {
                        0
                    },
                    millis: now_ms as u32,
                };
                match gate.admit(d.data, d.from, within_rate, clock, io) {
                    // Cluster: an admitted request whose pair another member
                    // owns goes there.
                    Verdict::Engine
                        if cparts.is_some() && forward(cparts, io, d.data, d.from, unix) => {}
                    Verdict::Engine => *to_engine = Some(d.from),
                    Verdict::CheckToken(req) => v2_in.push((req, d.from)),
                    Verdict::Cookie(c) => queue_bytes(queue, io, d.from, &c.to_bytes()),
                    Verdict::Drop => {}
                }
            }
            // v2: the batch's tokens, checked together; then, in a cluster,
            // what another member owns goes there.
            if !v2_in.is_empty() {
                let unix_secs = *wall.get_or_insert_with(Clock::unix_now);
                gate.check_tokens(v2_in, unix_secs, io);
            }
            if cparts.is_some() && !v2_in.is_empty() {
                v2_in.retain(|(req, from)| !forward(cparts, io, &req.to_bytes(), *from, unix));
            }
            let for_engine = &*for_engine;
            engine.handle_batch(
                n,
                |k| for_engine[k].map(|from| (recv.data(k), from)),
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
                            send_reply(queue, io, cparts, waiting, unix);
                            send_reply(queue, io, cparts, completing, unix);
                        }
                        Outcome::Replayed(t) => send_reply(queue, io, cparts, t, unix),
                        Outcome::Dropped(DropReason::SourceLimit(level))
                            if shared_limits && refused.len() < NOTES_PER_BATCH =>
                        {
                            refused.push((for_engine[k], *level));
                        }
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
                            send_v2(queue, io, cparts, waiting, unix);
                            send_v2(queue, io, cparts, completing, unix);
                        }
                        Outcome::Replayed(t) => send_v2(queue, io, cparts, t, unix),
                        Outcome::Dropped(DropReason::SourceLimit(level))
                            if shared_limits && refused.len() < NOTES_PER_BATCH =>
                        {
                            refused.push((admitted.get(k).map(|(_, from)| *from), *level));
                        }
                        _ => {}
                    }
                },
            );
            v2_in.clear();
            // A pending refusal is a share's when this worker's limit for
            // the prefix is below the whole and the prefix holds less than
            // the whole here.
            for (from, level) in refused.drain(..) {
                let Some(from) = from else { continue };
                let (ps, count) = prefixes(from.ip());
                let Some(p) = ps[..count].iter().find(|p| p.level == level) else {
                    continue;
                };
                let all = whole.at(level);
                let here = engine.source_limit(*p).unwrap_or(u32::MAX);
                if here < all && engine.source_held(*p) < all && notes.len() < NOTES_PER_BATCH {
                    notes.push(Limited::Pending(*p));
                }
            }
            if ep.queue.len() >= batch {
                flush(ep, io);
            }
            if let Some(c) = cparts.as_mut() {
                io.send_errors += c.lane.flush();
            }
        }
        flush(ep, io);
        if !self.notes.is_empty() {
            self.send_notes(now_ms);
        }
        handled
    }
}

impl Worker {
    /// Cluster mode, worker 0: takes what arrives on the cluster socket
    /// until it is drained: forwarded requests for this worker's engine, or
    /// handed to the worker that owns their pair; replies for clients.
    fn service_cluster(&mut self) {
        let now = self.cluster_now();
        let index = self.index;
        let Worker {
            endpoints,
            engine,
            io,
            cluster,
            cparts,
            batch,
            ..
        } = self;
        let Some(port) = cluster.as_mut() else {
            return;
        };
        let mut buf = [0u8; MAX_PAYLOAD];
        let mut wake = [false; super::MAX_WORKERS];
        while let Some(incoming) = port.next(now, &mut buf) {
            match incoming {
                Incoming::Request { via, client, len } => {
                    let owner = cparts
                        .as_ref()
                        .and_then(|c| c.steering)
                        .and_then(|s| s.worker(&buf[..len]))
                        .map_or(index, |w| w as usize);
                    if owner == index {
                        handle_relayed(
                            engine,
                            endpoints,
                            io,
                            cparts,
                            via,
                            client,
                            &buf[..len],
                            now,
                        );
                    } else {
                        let peer = cparts
                            .as_ref()
                            .and_then(|c| c.handoff.get(owner))
                            .and_then(Option::as_ref);
                        let handed = peer.is_some_and(|(tx, _)| {
                            tx.try_send(Relayed {
                                via,
                                client,
                                len,
                                bytes: buf,
                            })
                            .is_ok()
                        });
                        if handed {
                            wake[owner] = true;
                        } else {
                            io.send_dropped += 1;
                        }
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
                if ep.queue.len() >= *batch {
                    flush(ep, io);
                }
            }
        }
        if let Some(c) = cparts.as_ref() {
            for (k, _) in wake.iter().enumerate().filter(|(_, w)| **w) {
                if let Some(Some((_, waker))) = c.handoff.get(k) {
                    let _ = waker.wake();
                }
            }
        }
        for ep in endpoints.iter_mut() {
            flush(ep, io);
        }
        if let Some(c) = cparts.as_mut() {
            io.send_errors += c.lane.flush();
        }
    }

    /// Cluster mode, the other workers: the forwarded requests worker 0
    /// handed over.
    fn service_inbox(&mut self, now_ms: u64) -> bool {
        if !self.cparts.as_ref().is_some_and(|c| c.inbox.is_some()) {
            return false;
        }
        let now = Now {
            mono_ms: now_ms,
            unix_ms: unix_ms(),
        };
        let mut got = 0;
        // At most one queue's worth per turn, so the sockets get theirs.
        while got < HANDOFF_QUEUE {
            let Some(r) = self
                .cparts
                .as_ref()
                .and_then(|c| c.inbox.as_ref())
                .and_then(|inbox| inbox.try_recv().ok())
            else {
                break;
            };
            got += 1;
            let Worker {
                endpoints,
                engine,
                io,
                cparts,
                ..
            } = self;
            handle_relayed(
                engine,
                endpoints,
                io,
                cparts,
                r.via,
                r.client,
                &r.bytes[..r.len],
                now,
            );
        }
        if got == 0 {
            return false;
        }
        let Worker {
            endpoints,
            io,
            cparts,
            ..
        } = self;
        for ep in endpoints.iter_mut() {
            flush(ep, io);
        }
        if let Some(c) = cparts.as_mut() {
            io.send_errors += c.lane.flush();
        }
        true
    }
}

/// A forwarded request for this worker's engine: matched, and its replies
/// sent to the client from here or back through the member that forwarded.
#[allow(clippy::too_many_arguments)]
fn handle_relayed(
    engine: &mut Engine,
    endpoints: &mut [Endpoint],
    io: &mut IoCounters,
    cparts: &mut Option<ClusterParts>,
    via: u8,
    client: SocketAddr,
    request: &[u8],
    now: Now,
) {
    if request.len() == v2::REQUEST_LEN {
        // The member the client reached admitted it (token, cookie,
        // --require-auth); the cluster MAC vouches for that.
        let Ok(req) = v2::Request::parse(request) else {
            io.v2_malformed += 1;
            return;
        };
        let outcome = engine.handle_relayed_v2(&req, client, via, now.mono_ms);
        trace!("cluster: v2 forwarded from member {via}: {outcome:?}");
        let Some(ep) = client_endpoint(endpoints, client) else {
            return;
        };
        match &outcome {
            Outcome::Matched {
                waiting,
                completing,
            } => {
                send_v2(&mut ep.queue, io, cparts, waiting, now.unix_ms);
                send_v2(&mut ep.queue, io, cparts, completing, now.unix_ms);
            }
            Outcome::Replayed(t) => send_v2(&mut ep.queue, io, cparts, t, now.unix_ms),
            _ => {}
        }
        return;
    }
    let outcome = engine.handle_relayed(request, client, via, now.mono_ms);
    trace!("cluster: forwarded from member {via}: {outcome:?}");
    let Some(ep) = client_endpoint(endpoints, client) else {
        return;
    };
    match &outcome {
        Outcome::Matched {
            waiting,
            completing,
        } => {
            send_reply(&mut ep.queue, io, cparts, waiting, now.unix_ms);
            send_reply(&mut ep.queue, io, cparts, completing, now.unix_ms);
        }
        Outcome::Replayed(t) => send_reply(&mut ep.queue, io, cparts, t, now.unix_ms),
        _ => {}
    }
}

/// The client socket of `client`'s family (never a `--stun-port` one).
fn client_endpoint(endpoints: &mut [Endpoint], client: SocketAddr) -> Option<&mut Endpoint> {
    endpoints
        .iter_mut()
        .find(|e| e.kind == Kind::Main && e.local.is_ipv4() == client.is_ipv4())
}

/// Cluster mode: forwards an admitted request whose pair another member
/// owns, and says whether it did (the request is then done here).
fn forward(
    cparts: &mut Option<ClusterParts>,
    io: &mut IoCounters,
    request: &[u8],
    from: SocketAddr,
    unix_ms: u64,
) -> bool {
    let Some(c) = cparts.as_mut() else {
        return false;
    };
    let Some(via) = c.lane.owner(request) else {
        return false;
    };
    io.forwarded_out += 1;
    if !c.lane.forward(via, from, request, unix_ms) {
        io.send_dropped += 1;
    }
    true
}

/// [`send_reply`] for a v2 reply.
fn send_v2(
    queue: &mut SendQueue,
    io: &mut IoCounters,
    cparts: &mut Option<ClusterParts>,
    t: &Transmit<v2::Reply>,
    unix_ms: u64,
) {
    let bytes = t.reply.to_bytes();
    if let (true, Some(c)) = (t.via != 0, cparts.as_mut()) {
        if c.lane.relay(t.via, t.to, &bytes, unix_ms) {
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
    cparts: &mut Option<ClusterParts>,
    t: &Transmit,
    unix_ms: u64,
) {
    if let (true, Some(c)) = (t.via != 0, cparts.as_mut()) {
        let mut buf = [0u8; MAX_REPLY_LEN];
        let len = t.reply.emit(&mut buf);
        if c.lane.relay(t.via, t.to, &buf[..len], unix_ms) {
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

/// Queues a seed reply, encoded straight into the queue's slot.
fn queue_reply(queue: &mut SendQueue, io: &mut IoCounters, t: &Transmit) {
    if !queue.push_with(t.to, |slot| t.reply.emit(slot)) {
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
