//! The server loop: one thread, one `mio::Poll`, batched nonblocking UDP.
//!
//! [`Server`] owns the sockets (one per address family), their receive
//! batches and send queues, the [`Engine`] and the timers. A turn of the loop:
//! wait for readiness or the next timer; for each readable socket, receive
//! batches until `WouldBlock` or the per-wakeup budget, hand each datagram to
//! the engine and queue its replies; flush queues with `sendmmsg`; run a
//! bounded slice of expiry; print stats when due.
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
use mio::{Events, Interest, Poll, Token, Waker};

use crate::engine::{ConfigError, Engine, EngineConfig, Outcome, Transmit};
use crate::limit::{RateLimit, RateLimiter};
use crate::metrics::{Metrics, Snapshot};
use crate::stats::{Counters, IoCounters};
use crate::sys::{self, RecvBatch, SendQueue};
use crate::wire::{stun, MAX_REPLY_LEN};

/// How the server is set up. [`ServerConfig::default`] is what the binary
/// uses without flags, except that it binds nothing until told.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The matching engine's settings.
    pub engine: EngineConfig,
    /// Addresses to bind, at most one per family (port 0 picks a free port).
    pub bind: Vec<SocketAddr>,
    /// Datagrams per `recvmmsg`/`sendmmsg` call.
    pub batch: usize,
    /// SO_RCVBUF to ask for (0: kernel default).
    pub rcvbuf: usize,
    /// SO_SNDBUF to ask for (0: kernel default).
    pub sndbuf: usize,
    /// Log counters at info level this often; `None` never.
    pub stats_interval: Option<Duration>,
    /// Per-source rate limit applied to every datagram ([`RateLimit::OFF`] for none).
    pub rate_limit: RateLimit,
    /// Serve Prometheus metrics over HTTP on this TCP address.
    pub metrics: Option<SocketAddr>,
    /// Also answer STUN Binding requests on this port, on each bound address
    /// (0 picks a free port). The main port answers them anyway; a second
    /// port lets clients tell how their NAT maps (see `wire::stun`).
    pub stun_port: Option<u16>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            engine: EngineConfig::default(),
            bind: Vec::new(),
            batch: 64,
            rcvbuf: 4 << 20,
            sndbuf: 4 << 20,
            stats_interval: Some(Duration::from_secs(10)),
            rate_limit: RateLimit::default(),
            metrics: None,
            stun_port: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A bad setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--batch` out of range.
    #[error("--batch must be between 1 and {MAX_BATCH}, got {0}")]
    Batch(usize),
    /// Two addresses of one family, or none.
    #[error("bind at most one IPv4 and one IPv6 address, and at least one")]
    Bind,
    /// The port is taken.
    #[error("--port {port}: {addr} is already in use (another psync-server?)")]
    AddrInUse {
        /// The port asked for.
        port: u16,
        /// The full address.
        addr: SocketAddr,
    },
    /// The `--stun-port` is taken.
    #[error("--stun-port {port}: {addr} is already in use")]
    StunAddrInUse {
        /// The port asked for.
        port: u16,
        /// The full address.
        addr: SocketAddr,
    },
    /// Binding failed otherwise.
    #[error("cannot bind {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// The metrics address cannot be bound.
    #[error("--metrics {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// Setting up the poller failed.
    #[error("cannot set up the event loop: {0}")]
    Poll(#[from] io::Error),
}

/// Largest `--batch`: beyond this, batching buys nothing and delays replies.
pub const MAX_BATCH: usize = 1024;
/// Datagrams received per socket per wakeup before the loop looks at timers
/// and the other socket (as boringtun's MAX_ITR): fairness and bounded latency.
const RECV_BUDGET: usize = 4096;
/// Send-queue capacity in batches: room for bursts while the kernel drains.
const QUEUE_BATCHES: usize = 16;
/// How often expiry runs while the tables hold entries.
const EXPIRY_TICK: Duration = Duration::from_millis(10);

const WAKER: Token = Token(usize::MAX);

struct Endpoint {
    socket: mio::net::UdpSocket,
    local: SocketAddr,
    recv: RecvBatch,
    queue: SendQueue,
    /// Data may be waiting: mio is edge-triggered, so read until `WouldBlock`.
    readable: bool,
    /// A `--stun-port` socket: answers STUN Binding requests, drops the rest.
    stun_only: bool,
}

/// A handle that controls a running [`Server`] from another thread (the
/// binary's signal thread): each call sets a flag and wakes the loop, which
/// acts on it between batches, in its own thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    report: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Asks the server to finish the batch in hand and return from `run`
    /// (SIGINT, SIGTERM, SIGQUIT).
    pub fn shutdown(&self) {
        self.raise(&self.flag);
    }

    /// Asks the loop to run the reload hooks ([`Server::on_reload`]) (SIGHUP).
    pub fn reload(&self) {
        self.raise(&self.reload);
    }

    /// Asks the loop to log the counters now, at info level on the
    /// [`crate::cli::REPORT_TARGET`] target (SIGUSR1).
    pub fn report(&self) {
        self.raise(&self.report);
    }

    fn raise(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        // If the wake fails the loop still sees the flag at its next timer.
        let _ = self.waker.wake();
    }
}

/// What a reload (SIGHUP) runs, in the loop's thread between batches: it may
/// change the engine, and says what it reloaded (`Ok`, logged at info) or why
/// it kept the old state (`Err`, logged as a warning).
pub type ReloadHook = Box<dyn FnMut(&mut Engine) -> Result<String, String> + std::marker::Send>;

/// A bound, ready server. [`Server::run`] drives it.
pub struct Server {
    poll: Poll,
    endpoints: Vec<Endpoint>,
    engine: Engine,
    limiter: Option<RateLimiter>,
    /// What happened on the sockets (the engine counts its own decisions).
    io: IoCounters,
    /// Per datagram of the batch in hand: for the engine (passed the rate
    /// limiter and is not STUN).
    for_engine: Box<[bool]>,
    metrics: Option<Metrics>,
    batch: usize,
    stats_interval: Option<Duration>,
    start: Instant,
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    report: Arc<AtomicBool>,
    reload_hooks: Vec<ReloadHook>,
    waker: Arc<Waker>,
    /// When the oldest metrics connection must be closed.
    metrics_deadline: Option<Instant>,
}

impl Server {
    /// Validates `cfg`, allocates every table and buffer, and binds the sockets.
    pub fn bind(cfg: &ServerConfig) -> Result<Server, ServerError> {
        if cfg.batch == 0 || cfg.batch > MAX_BATCH {
            return Err(ServerError::Batch(cfg.batch));
        }
        let v4 = cfg.bind.iter().filter(|a| a.is_ipv4()).count();
        let v6 = cfg.bind.iter().filter(|a| a.is_ipv6()).count();
        if v4 > 1 || v6 > 1 || v4 + v6 == 0 {
            return Err(ServerError::Bind);
        }
        let mut engine_cfg = cfg.engine.clone();
        engine_cfg.ipv4 = v4 == 1;
        engine_cfg.ipv6 = v6 == 1;
        let engine = Engine::new(&engine_cfg)?;

        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut endpoints = Vec::new();
        let stun_binds = cfg
            .stun_port
            .into_iter()
            .flat_map(|port| cfg.bind.iter().map(move |a| SocketAddr::new(a.ip(), port)));
        let binds: Vec<(SocketAddr, bool)> = cfg
            .bind
            .iter()
            .map(|&a| (a, false))
            .chain(stun_binds.map(|a| (a, true)))
            .collect();
        for (i, &(addr, stun_only)) in binds.iter().enumerate() {
            let (std_socket, buffers) =
                sys::bind_udp(addr, cfg.rcvbuf, cfg.sndbuf).map_err(|source| {
                    if source.kind() == io::ErrorKind::AddrInUse && stun_only {
                        ServerError::StunAddrInUse {
                            port: addr.port(),
                            addr,
                        }
                    } else if source.kind() == io::ErrorKind::AddrInUse {
                        ServerError::AddrInUse {
                            port: addr.port(),
                            addr,
                        }
                    } else {
                        ServerError::Socket { addr, source }
                    }
                })?;
            if buffers.rcv_got < buffers.rcv_wanted {
                warn!(
                    "{addr}: asked for a {} KiB receive buffer, the kernel granted {} KiB; \
                     raise net.core.rmem_max to avoid drops under bursts",
                    buffers.rcv_wanted >> 10,
                    buffers.rcv_got >> 10
                );
            }
            if buffers.snd_got < buffers.snd_wanted {
                warn!(
                    "{addr}: asked for a {} KiB send buffer, the kernel granted {} KiB; \
                     raise net.core.wmem_max",
                    buffers.snd_wanted >> 10,
                    buffers.snd_got >> 10
                );
            }
            let local = std_socket.local_addr()?;
            let mut socket = mio::net::UdpSocket::from_std(std_socket);
            poll.registry().register(
                &mut socket,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            endpoints.push(Endpoint {
                socket,
                local,
                recv: RecvBatch::new(cfg.batch),
                queue: SendQueue::new(cfg.batch * 2 * QUEUE_BATCHES, cfg.batch),
                // Data may have arrived between bind and register.
                readable: true,
                stun_only,
            });
        }
        let metrics = match cfg.metrics {
            Some(addr) => Some(
                Metrics::bind(addr, poll.registry())
                    .map_err(|source| ServerError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let limiter_seed = match cfg.engine.seed {
            // Two splitmix64 steps: well-mixed keys even from a seed like 7.
            Some(seed) => [splitmix64(seed), splitmix64(seed ^ 0x5851_f42d_4c95_7f2d)],
            None => {
                let mut b = [0u8; 16];
                getrandom::fill(&mut b)
                    .map_err(|e| ServerError::Poll(io::Error::other(e.to_string())))?;
                [
                    u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
                    u64::from_le_bytes(b[8..].try_into().unwrap_or_default()),
                ]
            }
        };
        Ok(Server {
            poll,
            endpoints,
            engine,
            limiter: RateLimiter::new(cfg.rate_limit, limiter_seed),
            io: IoCounters::default(),
            for_engine: vec![false; cfg.batch].into_boxed_slice(),
            metrics,
            batch: cfg.batch,
            stats_interval: cfg.stats_interval,
            start: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            reload: Arc::new(AtomicBool::new(false)),
            report: Arc::new(AtomicBool::new(false)),
            reload_hooks: Vec::new(),
            waker,
            metrics_deadline: None,
        })
    }

    /// The bound addresses (with the real port when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints
            .iter()
            .filter(|e| !e.stun_only)
            .map(|e| e.local)
            .collect()
    }

    /// The `--stun-port` addresses, one per bound address (empty without it).
    pub fn stun_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints
            .iter()
            .filter(|e| e.stun_only)
            .map(|e| e.local)
            .collect()
    }

    /// The metrics endpoint's address, when `--metrics` was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    fn snapshot(&mut self) -> Snapshot {
        Snapshot {
            counters: self.counters(),
            capacity: self.engine.capacity(),
            replay_entries: self.engine.replay_entries(),
            wait: *self.engine.wait(),
            uptime: self.start.elapsed().as_secs_f64(),
            udp_sockets: self.endpoints.len(),
            stopping: self.stop.load(Ordering::Acquire),
        }
    }

    /// Adds a hook that [`ShutdownHandle::reload`] (SIGHUP) runs. Hooks run
    /// in the order added; with none, a reload logs that there was nothing
    /// to reload.
    pub fn on_reload(&mut self, hook: ReloadHook) {
        self.reload_hooks.push(hook);
    }

    /// Acts on the reload and report flags; called by the loop between batches.
    fn control(&mut self) {
        if self.report.swap(false, Ordering::AcqRel) {
            let counters = self.counters();
            info!(target: crate::cli::REPORT_TARGET, "counters {counters}");
        }
        if self.reload.swap(false, Ordering::AcqRel) {
            if self.reload_hooks.is_empty() {
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

    /// A handle to stop [`Server::run`] from another thread or a signal thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            flag: self.stop.clone(),
            reload: self.reload.clone(),
            report: self.report.clone(),
            waker: self.waker.clone(),
        }
    }

    /// The counters now, gauges included.
    pub fn counters(&mut self) -> Counters {
        let mut io = self.io;
        io.kernel_drops = self
            .endpoints
            .iter()
            .map(|e| sys::socket_drops(&e.socket).unwrap_or(0))
            .sum();
        Counters::new(self.engine.counters(), io)
    }

    /// Bytes allocated by the engine's tables.
    pub fn table_bytes(&self) -> usize {
        self.engine.allocated_bytes()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs until [`ShutdownHandle::shutdown`]; returns the final counters.
    pub fn run(&mut self) -> io::Result<Counters> {
        let mut events = Events::with_capacity(64);
        let mut next_stats = self.stats_interval.map(|d| Instant::now() + d);
        let mut next_expiry = Instant::now();
        let mut expiry_owed = false;
        loop {
            let now = Instant::now();
            let timeout = if self
                .endpoints
                .iter()
                .any(|e| e.readable && can_read(e, self.batch))
            {
                Some(Duration::ZERO)
            } else {
                let mut t = next_stats.map(|s| s.saturating_duration_since(now));
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
            if self.stop.load(Ordering::Acquire) {
                break;
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
                    info!("stats {}", self.counters());
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
        let Server {
            endpoints,
            engine,
            limiter,
            io,
            for_engine,
            ..
        } = self;
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
            for (k, ok) in for_engine.iter_mut().enumerate().take(n) {
                *ok = false;
                let Some(d) = recv.get(k) else {
                    io.recv_errors += 1;
                    continue;
                };
                if let Some(l) = limiter.as_mut() {
                    if !l.allow(d.from.ip(), now_ms as u32) {
                        io.rate_limited += 1;
                        continue;
                    }
                }
                if *stun_only || stun::is_stun(d.data) {
                    answer_stun(queue, io, d);
                    continue;
                }
                *ok = true;
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
                            queue_reply(queue, io, waiting);
                            queue_reply(queue, io, completing);
                        }
                        Outcome::Replayed(t) => queue_reply(queue, io, t),
                        _ => {}
                    }
                },
            );
            if ep.queue.len() >= batch {
                flush(ep, io);
            }
        }
        flush(ep, io);
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
