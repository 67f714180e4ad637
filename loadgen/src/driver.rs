//! The load loop: sockets, the `mio` poll, timers and the run's phases.
//!
//! One thread drives everything. A turn of the loop: time out old pairs;
//! start the pairs that are due (queueing their requests in per-socket
//! outboxes); flush the outboxes with `sendmmsg`; print progress once a
//! second; sleep until a reply, the next due pair or a deadline (a `timerfd`
//! gives sub-millisecond wake-ups, which an open-loop schedule needs);
//! drain every readable socket with `recvmmsg` and judge each reply.
//!
//! Phases: an optional preload of one-sided registrations (`--pending`),
//! then warmup, then the measured window, then a drain that waits for the
//! last pairs' replies or timeouts. Nothing in the loop allocates or formats
//! per pair; the progress line is formatted once a second.

use std::io::{self, IsTerminal, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use psync::wire::{PeerId, Request, REQUEST_LEN};
use socket2::{Domain, Protocol, Socket, Type};

use crate::format::{Format, MAX_REQUEST};
use crate::pairs::{Nanos, Outcome, Pairs, PairsConfig, Ports, Tally, Wrong, WrongCounts};
use crate::sched::{Load, Scheduler};
use psync::sys::{self, RecvBatch, SendQueue};

/// Everything a run needs, validated by the front end.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server (the first of `servers`).
    pub server: SocketAddr,
    /// Every server: the members of a cluster, or just `server`. With
    /// several, the two halves of a pair go to different ones.
    pub servers: Vec<SocketAddr>,
    /// The address our sockets bind to, which the server must see unchanged.
    pub local_ip: IpAddr,
    /// Sockets simulating peers.
    pub sockets: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Load before the measured window, not counted.
    pub warmup: Duration,
    /// A pair not complete after this long is lost.
    pub timeout: Duration,
    /// Open or closed loop.
    pub load: Load,
    /// One-sided registrations to send first.
    pub pending: u64,
    /// Fraction of requests sent a second time, after their reply.
    pub retransmit: f64,
    /// Malformed datagrams per pair.
    pub bad_ratio: f64,
    /// Ports the server may hand out, when checked.
    pub port_range: Option<(u16, u16)>,
    /// Print a progress line every second.
    pub progress: bool,
    /// Set (by SIGINT) to end the run early and report what was measured.
    pub stop: Arc<AtomicBool>,
    /// Seed-format requests, or v2 with tokens (`--auth-key-file`).
    pub format: Format,
    /// This driver's place among `--threads`: which one, of how many, and
    /// where each publishes its progress (completed, lost, wrong) for the
    /// progress line, which thread 0 prints for all.
    pub thread: Thread,
}

/// A driver's place among several (`--threads`).
#[derive(Clone, Debug)]
pub struct Thread {
    /// Which one (0 prints the progress line).
    pub index: usize,
    /// How many.
    pub of: usize,
    /// Per thread: completed, lost and wrong pairs so far.
    pub progress: Arc<[AtomicU64]>,
}

impl Thread {
    /// The only thread.
    pub fn alone() -> Thread {
        Thread::new(0, 1)
    }

    /// Threads `0..of`, sharing one progress table: returns thread 0; clone
    /// it and set `index` for the others.
    pub fn new(index: usize, of: usize) -> Thread {
        Thread {
            index,
            of,
            progress: (0..3 * of.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The first ID of this thread's pairs and of its one-sided
    /// registrations: the 32-bit ID space is split among the threads (so
    /// that no two threads' pairs meet), and each part in two, pairs first.
    fn id_bases(&self, random: u32) -> (u32, u32) {
        let bits = usize::BITS - (self.of.max(1) - 1).leading_zeros();
        let part = 1u64 << (32 - bits.min(31));
        let start = (self.index as u64 * part) as u32;
        let half = (part / 2) as u32;
        let pairs = start.wrapping_add(random % half);
        (pairs, pairs.wrapping_add(half) & !1)
    }

    fn publish(&self, completed: u64, lost: u64, wrong: u64) {
        let k = 3 * self.index;
        self.progress[k].store(completed, Ordering::Relaxed);
        self.progress[k + 1].store(lost, Ordering::Relaxed);
        self.progress[k + 2].store(wrong, Ordering::Relaxed);
    }

    /// Completed, lost and wrong over every thread.
    fn totals(&self) -> (u64, u64, u64) {
        let sum = |f: usize| {
            (0..self.of.max(1))
                .map(|t| self.progress[3 * t + f].load(Ordering::Relaxed))
                .sum()
        };
        (sum(0), sum(1), sum(2))
    }
}

/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;
/// Longest datagram we send: requests are 8 bytes, malformed ones up to a
/// reply's 32 (to check that a reflected reply is not taken for a request).
pub const MAX_SEND: usize = 32;
/// Bytes kept of a received datagram: more than any reply (a v2 reply is
/// 152 bytes), so that with `MSG_TRUNC` a longer datagram is seen at its
/// real length.
pub const RECV_LEN: usize = 256;
/// Datagrams one socket can hold unsent (its `SendQueue`). Callers flush at
/// [`BATCH`], so this only fills while the kernel refuses to take more.
pub const OUTBOX_LEN: usize = 4 * BATCH;

/// How long a timed-out socket pair rests at least, so a straggling reply
/// is counted late rather than taken for the next pair's.
const MIN_GRACE: Duration = Duration::from_secs(1);
/// One-sided registrations sent per `PRELOAD_TICK`: about 128k per second,
/// below what a server on a shared core takes without dropping.
const PRELOAD_BURST: u64 = 128;
const PRELOAD_TICK: Nanos = 1_000_000;
const PROGRESS_EVERY: Nanos = 1_000_000_000;
/// Latencies are recorded in nanoseconds up to a minute, to 3 significant digits.
const HIST_MAX: u64 = 60_000_000_000;
const TIMER: Token = Token(usize::MAX - 1);
const NO_SOCKET: u16 = u16::MAX;

/// The first wrong reply, kept for the report.
#[derive(Clone, Copy, Debug)]
pub struct WrongSample {
    /// What was wrong.
    pub kind: Wrong,
    /// The receiving socket's address.
    pub at: SocketAddr,
    /// The datagram's first bytes.
    pub bytes: [u8; RECV_LEN],
    /// Its real length.
    pub len: usize,
}

/// What a run measured.
pub struct Results {
    /// The load model used.
    pub load: Load,
    /// The measured window (shorter than asked when interrupted).
    pub window: Duration,
    /// Pairs the open-loop schedule put in the window.
    pub scheduled: Option<u64>,
    /// Counts over pairs scheduled in the window.
    pub measured: Tally,
    /// Pairs, whenever scheduled, whose second reply arrived in the window:
    /// the throughput, even when an overloaded schedule runs behind.
    pub window_completed: u64,
    /// Counts over every pair.
    pub all: Tally,
    /// Wrong replies by kind, warmup included.
    pub wrong: WrongCounts,
    /// Pair-completion latency of measured pairs, in nanoseconds.
    pub histogram: Histogram<u64>,
    /// Open loop: pairs scheduled in the window never sent because no
    /// socket pair was free before it ended.
    pub unsent: u64,
    /// Open loop: warmup pairs still unsent when the warmup ended, dropped.
    pub warmup_skipped: u64,
    /// Pairs that had to wait for a free socket pair.
    pub slot_waits: u64,
    /// Malformed datagrams sent.
    pub bad_sent: u64,
    /// One-sided registrations sent.
    pub pending_sent: u64,
    /// Datagrams from somewhere other than the server's port.
    pub stray: u64,
    /// Datagrams the kernel refused, or that found the outbox full.
    pub send_failed: u64,
    /// CPU time of the load threads during the measured window (each
    /// thread's own, summed).
    pub cpu: Duration,
    /// Our CPU time over the whole run (setup, preload and warmup included).
    pub cpu_total: Duration,
    /// The first wrong reply.
    pub first_wrong: Option<WrongSample>,
    /// Sockets used.
    pub sockets: usize,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Binding a peer socket failed.
    #[error("cannot bind socket {index} on {ip}: {source}{hint}")]
    Bind {
        /// Which socket.
        index: usize,
        /// The address.
        ip: IpAddr,
        /// What the OS said.
        source: io::Error,
        /// Advice when the descriptor limit is the cause.
        hint: &'static str,
    },
    /// The poller or timer failed.
    #[error("cannot set up the event loop: {0}")]
    Poll(#[from] io::Error),
}

/// A small, fast generator for the retransmit and malformed-datagram dice
/// (xorshift64*); not for anything secret.
struct Dice(u64);

impl Dice {
    fn seeded() -> Dice {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Dice((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64) < p * (1u64 << 53) as f64
    }
}

/// The address the server will see our sockets at: the source address the
/// kernel picks for the route to it.
pub fn local_ip_for(server: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let probe = UdpSocket::bind(any)?;
    probe.connect(server)?;
    Ok(probe.local_addr()?.ip())
}

struct Peers {
    sockets: Vec<mio::net::UdpSocket>,
    addrs: Vec<SocketAddr>,
    outboxes: Vec<SendQueue>,
    dirty: Vec<u16>,
    is_dirty: Vec<bool>,
    blocked: Vec<bool>,
    /// Our socket index by local port.
    by_port: Box<[u16]>,
    servers: Vec<SocketAddr>,
    send_failed: u64,
    registry: mio::Registry,
}

/// Where a datagram goes: with several servers (a cluster), a request
/// `(a, b)` goes to server `min(a, b) + [a > b]` (mod their number), so the
/// two halves of a pair always reach different members and a retransmit
/// the same one; anything else goes to the first.
fn destination(servers: &[SocketAddr], payload: &[u8]) -> SocketAddr {
    match <[u8; 8]>::try_from(payload) {
        Ok(b) if servers.len() > 1 => {
            let a = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let c = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let k = a.min(c).wrapping_add(u32::from(a > c));
            servers[k as usize % servers.len()]
        }
        _ => servers[0],
    }
}

impl Peers {
    fn bind(cfg: &Config, poll: &Poll) -> Result<Peers, SetupError> {
        let n = cfg.sockets;
        let mut peers = Peers {
            sockets: Vec::with_capacity(n),
            addrs: Vec::with_capacity(n),
            outboxes: (0..n).map(|_| SendQueue::new(OUTBOX_LEN, BATCH)).collect(),
            dirty: Vec::with_capacity(n),
            is_dirty: vec![false; n],
            blocked: vec![false; n],
            by_port: vec![NO_SOCKET; 1 << 16].into_boxed_slice(),
            servers: if cfg.servers.is_empty() {
                vec![cfg.server]
            } else {
                cfg.servers.clone()
            },
            send_failed: 0,
            registry: poll.registry().try_clone()?,
        };
        // Each socket has at most one request per socket pair awaiting a
        // reply, plus replays: size the receive buffer for that (the kernel
        // caps it at net.core.rmem_max) so bursts are not dropped here.
        let rcvbuf = (2 * n + BATCH) * 2048;
        for index in 0..n {
            let err = |source: io::Error| {
                let hint = if source.raw_os_error() == Some(libc::EMFILE) {
                    " (too many open files: lower --sockets or raise `ulimit -n`)"
                } else {
                    ""
                };
                SetupError::Bind {
                    index,
                    ip: cfg.local_ip,
                    source,
                    hint,
                }
            };
            let addr = SocketAddr::new(cfg.local_ip, 0);
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
                .map_err(err)?;
            s.set_nonblocking(true).map_err(err)?;
            if s.recv_buffer_size().map_err(err)? < rcvbuf {
                s.set_recv_buffer_size(rcvbuf).map_err(err)?;
            }
            s.bind(&addr.into()).map_err(err)?;
            let std: UdpSocket = s.into();
            let local = std.local_addr().map_err(err)?;
            let mut socket = mio::net::UdpSocket::from_std(std);
            // Writable interest is added only while a socket is blocked:
            // on loopback every send would otherwise wake the loop.
            poll.registry()
                .register(&mut socket, Token(index), Interest::READABLE)
                .map_err(err)?;
            peers.by_port[usize::from(local.port())] = index as u16;
            peers.addrs.push(local);
            peers.sockets.push(socket);
        }
        Ok(peers)
    }

    /// Queues `payload` on socket `i`, sending a full batch at once.
    fn queue(&mut self, i: usize, payload: &[u8]) {
        let to = destination(&self.servers, payload);
        if !self.outboxes[i].push(to, payload) {
            self.send_failed += 1;
            return;
        }
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(i as u16);
        }
        if self.outboxes[i].len() >= BATCH && !self.blocked[i] {
            self.flush_one(i);
        }
    }

    fn flush_one(&mut self, i: usize) {
        let done = self.outboxes[i].flush(&self.sockets[i]);
        self.send_failed += done.errors;
        if done.blocked && !self.blocked[i] {
            self.set_blocked(i, true);
        }
    }

    /// Marks socket `i` as waiting for room in its send buffer, or not, and
    /// asks for writable events only while it waits.
    fn set_blocked(&mut self, i: usize, blocked: bool) {
        self.blocked[i] = blocked;
        let interest = if blocked {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if self
            .registry
            .reregister(&mut self.sockets[i], Token(i), interest)
            .is_err()
        {
            // Cannot happen for a registered socket; if it did, polling for
            // writability is lost, so stop waiting for it.
            self.blocked[i] = false;
        }
    }

    /// Sends every queued datagram the kernel takes now.
    fn flush(&mut self) {
        let mut k = 0;
        while k < self.dirty.len() {
            let i = usize::from(self.dirty[k]);
            if !self.blocked[i] {
                self.flush_one(i);
            }
            if self.outboxes[i].is_empty() {
                self.is_dirty[i] = false;
                self.dirty.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }
}

/// The bytes of malformed datagram number `k`: wrong lengths around the
/// real ones (built from a real request, so a server that ignored the length
/// would answer), and a self-pair.
fn malformed(k: u64, req: Request, buf: &mut [u8; MAX_SEND]) -> usize {
    let bytes = req.emit();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = bytes[i % REQUEST_LEN];
    }
    match k % 8 {
        0 => 0,
        1 => 1,
        2 => 7,
        3 => 9,
        4 => 16,
        5 => psync::wire::REPLY_V4_LEN,
        6 => psync::wire::REPLY_V6_LEN,
        _ => {
            let selfish = Request {
                self_id: req.self_id,
                peer_id: req.self_id,
            };
            buf[..REQUEST_LEN].copy_from_slice(&selfish.emit());
            REQUEST_LEN
        }
    }
}

struct Progress {
    enabled: bool,
    tty: bool,
    next: Nanos,
    last_at: Nanos,
    last_completed: u64,
    wrote: bool,
}

impl Progress {
    fn line(&mut self, text: std::fmt::Arguments<'_>) {
        let mut err = io::stderr().lock();
        // On a terminal, rewrite one line in place; in a log, one per second.
        let _ = if self.tty {
            write!(err, "\r\x1b[2K{text}")
        } else {
            writeln!(err, "{text}")
        };
        let _ = err.flush();
        self.wrote = true;
    }

    fn finish(&mut self) {
        if self.tty && self.wrote {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Runs the load on `cfg.thread.of` threads (each with its own sockets and
/// pairs, `cfg` being thread 0's) and merges what they measured.
pub fn run_threads(cfgs: Vec<Config>) -> Result<Results, SetupError> {
    let handles: Vec<_> = cfgs
        .into_iter()
        .map(|cfg| {
            std::thread::Builder::new()
                .name(format!("loadgen-{}", cfg.thread.index))
                .spawn(move || run(&cfg))
        })
        .collect::<Result<_, _>>()?;
    let mut merged: Option<Results> = None;
    let mut failure = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => match merged.as_mut() {
                Some(m) => m.merge(r),
                None => merged = Some(r),
            },
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => {
                failure = failure.or(Some(SetupError::Poll(io::Error::other(
                    "a load thread panicked",
                ))))
            }
        }
    }
    match (failure, merged) {
        (Some(e), _) => Err(e),
        (None, Some(mut m)) => {
            m.cpu_total = sys::cpu_time();
            Ok(m)
        }
        (None, None) => Err(SetupError::Poll(io::Error::other("no load thread ran"))),
    }
}

impl Results {
    /// Adds another thread's results to these (histograms merged, counts
    /// summed, the longer window kept).
    pub fn merge(&mut self, o: Results) {
        fn add(a: &mut Tally, b: &Tally) {
            a.issued += b.issued;
            a.completed += b.completed;
            a.lost += b.lost;
            a.late += b.late;
            a.replayed += b.replayed;
            a.replay_missing += b.replay_missing;
            a.wrong_pairs += b.wrong_pairs;
        }
        self.load = match (self.load, o.load) {
            (Load::Rate(a), Load::Rate(b)) => Load::Rate(a + b),
            (Load::Window(a), Load::Window(b)) => Load::Window(a + b),
            (l, _) => l,
        };
        self.window = self.window.max(o.window);
        self.scheduled = match (self.scheduled, o.scheduled) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        add(&mut self.measured, &o.measured);
        add(&mut self.all, &o.all);
        self.window_completed += o.window_completed;
        for (a, b) in self.wrong.0.iter_mut().zip(o.wrong.0.iter()) {
            *a += b;
        }
        let _ = self.histogram.add(&o.histogram);
        self.unsent += o.unsent;
        self.warmup_skipped += o.warmup_skipped;
        self.slot_waits += o.slot_waits;
        self.bad_sent += o.bad_sent;
        self.pending_sent += o.pending_sent;
        self.stray += o.stray;
        self.send_failed += o.send_failed;
        self.cpu += o.cpu;
        self.cpu_total = self.cpu_total.max(o.cpu_total);
        self.first_wrong = self.first_wrong.or(o.first_wrong);
        self.sockets += o.sockets;
    }
}

/// Runs the load and returns what it measured.
pub fn run(cfg: &Config) -> Result<Results, SetupError> {
    let mut poll = Poll::new()?;
    let mut peers = Peers::bind(cfg, &poll)?;
    let mut timer = sys::Timer::new()?;
    poll.registry()
        .register(&mut SourceFd(&timer.as_raw_fd()), TIMER, Interest::READABLE)?;
    let mut recv = RecvBatch::with_buf_len(BATCH, RECV_LEN);
    let mut events = Events::with_capacity(cfg.sockets + 1);
    let mut dice = Dice::seeded();
    let timeout = cfg.timeout.as_nanos() as Nanos;
    let (id_base, pending_base) = cfg.thread.id_bases(dice.next() as u32);
    let mut pairs = Pairs::new(PairsConfig {
        sockets: cfg.sockets,
        timeout,
        grace: cfg.timeout.max(MIN_GRACE).as_nanos() as Nanos,
        port_range: cfg.port_range,
        id_base,
    });
    // `pending_base` is disjoint from the pairs' IDs, and one-sided
    // registrations are never each other's counterpart: every one has an
    // even self_id.
    let mut hist_all = Histogram::<u64>::new_with_bounds(1, HIST_MAX, 3).expect("valid bounds");
    let mut hist = hist_all.clone();
    let server_port = cfg.server.port();
    let start = Instant::now();
    let clock = || start.elapsed().as_nanos() as Nanos;

    let mut progress = Progress {
        enabled: cfg.progress && cfg.thread.index == 0,
        tty: io::stderr().is_terminal(),
        next: PROGRESS_EVERY,
        last_at: 0,
        last_completed: 0,
        wrote: false,
    };
    let mut pending_sent = 0u64;
    let mut next_preload: Nanos = 0;
    // Set when the preload is over: the schedule and its window.
    let mut schedule: Option<(Scheduler, Nanos, Nanos)> = None;
    let mut cpu_start: Option<Duration> = None;
    let mut cpu_end: Option<Duration> = None;
    let mut warmup_skipped = 0u64;
    let mut slot_waits = 0u64;
    let mut last_wait: Option<u64> = None;
    let mut bad_sent = 0u64;
    let mut stray = 0u64;
    let mut first_wrong: Option<WrongSample> = None;
    let mut timer_target: Option<Nanos> = None;
    let mut bad_buf = [0u8; MAX_SEND];
    let mut req_buf = [0u8; MAX_REQUEST];
    let format = &cfg.format;
    // The measured window, and the pairs (of any schedule time) completed in it.
    let mut window: (Nanos, Nanos) = (Nanos::MAX, Nanos::MAX);
    let mut window_completed = 0u64;

    loop {
        let now = clock();
        let stop = cfg.stop.load(Ordering::Relaxed);

        if schedule.is_none() {
            if stop {
                break;
            }
            if pending_sent < cfg.pending {
                if now >= next_preload {
                    let burst = PRELOAD_BURST.min(cfg.pending - pending_sent);
                    for _ in 0..burst {
                        let k = pending_sent;
                        let x = pending_base.wrapping_add((k as u32).wrapping_mul(2));
                        let req = Request {
                            self_id: PeerId::from_u32(x),
                            peer_id: PeerId::from_u32(x.wrapping_add(1)),
                        };
                        let n = format.encode(&req, &mut req_buf);
                        peers.queue((k % cfg.sockets as u64) as usize, &req_buf[..n]);
                        pending_sent += 1;
                    }
                    next_preload = now + PRELOAD_TICK;
                }
            } else {
                let warm_end = now + cfg.warmup.as_nanos() as Nanos;
                let end = warm_end + cfg.duration.as_nanos() as Nanos;
                schedule = Some((Scheduler::new(cfg.load, now, end), warm_end, end));
                window = (warm_end, end);
                progress.next = now + PROGRESS_EVERY;
                progress.last_at = now;
            }
        }

        pairs.expire(now);

        if let Some((sched, warm_end, end)) = schedule.as_mut() {
            if stop && now < *end {
                // Interrupted: end the window here and report what we have
                // (nothing measured, if still warming up).
                *end = now;
                *warm_end = (*warm_end).min(now);
                window = (*warm_end, *end);
                sched.stop_at(*end);
            }
            if cpu_start.is_none() && now >= *warm_end {
                cpu_start = Some(sys::thread_cpu_time());
                // Warmup pairs still unsent are dropped (they are not
                // measured): the window starts on its own schedule.
                warmup_skipped = sched.skip_to(*warm_end);
            }
            if cpu_end.is_none() && now >= *end {
                cpu_end = Some(sys::thread_cpu_time());
            }
            while let Some(at) = sched.due(now, pairs.outstanding()) {
                let measured = at >= *warm_end;
                let retransmit = if cfg.retransmit > 0.0 {
                    u8::from(dice.chance(cfg.retransmit))
                        | (u8::from(dice.chance(cfg.retransmit)) << 1)
                } else {
                    0
                };
                let Some(issue) = pairs.issue(at, now, measured, retransmit) else {
                    if last_wait != Some(sched.issued()) {
                        last_wait = Some(sched.issued());
                        slot_waits += 1;
                    }
                    break;
                };
                sched.taken();
                let n = format.encode(&issue.first.1, &mut req_buf);
                peers.queue(issue.first.0, &req_buf[..n]);
                let n = format.encode(&issue.second.1, &mut req_buf);
                peers.queue(issue.second.0, &req_buf[..n]);
                if dice.chance(cfg.bad_ratio) {
                    let len = malformed(bad_sent, issue.second.1, &mut bad_buf);
                    peers.queue(issue.second.0, &bad_buf[..len]);
                    bad_sent += 1;
                }
            }
        }
        peers.flush();

        if let Some((_, _, end)) = schedule {
            if now >= end && pairs.busy() == 0 {
                break;
            }
        }

        cfg.thread
            .publish(pairs.all.completed, pairs.all.lost, pairs.wrong.total());
        if now >= progress.next && !progress.enabled {
            progress.next = now + PROGRESS_EVERY;
        }
        if now >= progress.next {
            // Thread 0 speaks for all (the others' counts are as of their
            // last turn).
            let (completed, lost, wrong) = cfg.thread.totals();
            let dt = (now - progress.last_at) as f64 / 1e9;
            let rate = completed.saturating_sub(progress.last_completed) as f64 / dt.max(1e-9);
            progress.last_at = now;
            progress.last_completed = completed;
            progress.next = now + PROGRESS_EVERY;
            match schedule {
                None => progress.line(format_args!(
                    "preload {pending_sent}/{} one-sided registrations",
                    cfg.pending
                )),
                Some((ref sched, warm_end, _)) => {
                    // Until a measured pair completes, show the warmup's p99.
                    let h = if hist.is_empty() { &hist_all } else { &hist };
                    let phase = if now < warm_end { " (warmup)" } else { "" };
                    let since = now.saturating_sub(sched.start()) as f64 / 1e9;
                    progress.line(format_args!(
                        "{since:6.1}s  {rate:9.0} pairs/s  p99 {:9.1} us  lost {lost}  wrong {wrong}{phase}",
                        h.value_at_quantile(0.99) as f64 / 1e3,
                    ))
                }
            }
        }

        // Sleep until the earliest thing that needs us, unless data waits.
        let mut wake = progress.next;
        if let Some(t) = pairs.next_deadline() {
            wake = wake.min(t);
        }
        match schedule {
            None => wake = wake.min(next_preload),
            Some((ref sched, _, end)) => {
                // While no socket pair is free, a reply or a deadline wakes us.
                if last_wait != Some(sched.issued()) || pairs.free() > 0 {
                    if let Some(t) = sched.next_due() {
                        wake = wake.min(t);
                    }
                }
                if now < end {
                    wake = wake.min(end);
                }
            }
        }
        let now = clock();
        let poll_timeout = if wake <= now {
            Some(Duration::ZERO)
        } else {
            if timer_target != Some(wake) {
                timer.arm(Duration::from_nanos(wake - now))?;
                timer_target = Some(wake);
            }
            None
        };
        if let Err(e) = poll.poll(&mut events, poll_timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for event in events.iter() {
            let token = event.token();
            if token == TIMER {
                // No read needed: re-arming resets the expiry count, and the
                // edge-triggered registration reports every new expiry.
                timer_target = None;
                continue;
            }
            let i = token.0;
            if i >= cfg.sockets {
                continue;
            }
            if event.is_writable() && peers.blocked[i] {
                peers.set_blocked(i, false);
            }
            if !event.is_readable() {
                continue;
            }
            // Until WouldBlock (drained); an unconnected UDP socket reports
            // no other receive error.
            while let Ok(n) = recv.recv(&peers.sockets[i]) {
                let now = clock();
                for k in 0..n {
                    // No address (a family other than IPv4/IPv6) reads as stray.
                    let (data, len, port) = match recv.get(k) {
                        Some(d) => (d.data, d.len, Some(d.from.port())),
                        None => (&[][..], 0, None),
                    };
                    let from_server = match recv.get(k) {
                        Some(d) if cfg.servers.len() > 1 => peers.servers.contains(&d.from),
                        _ => port == Some(server_port),
                    };
                    if !from_server {
                        stray += 1;
                        continue;
                    }
                    let verdict = match format.decode(data, len, peers.addrs[i]) {
                        Err(w) => Err(w),
                        Ok(r) if r.peer.is_ipv4() != cfg.server.is_ipv4() => Err(Wrong::Family),
                        Ok(r) if r.peer.ip() != cfg.local_ip => Err(Wrong::NotOurs),
                        Ok(r) => match peers.by_port[usize::from(r.peer.port())] {
                            NO_SOCKET => Err(Wrong::NotOurs),
                            j => {
                                let ports = Ports {
                                    src: r.src_port,
                                    dst: r.dst_port,
                                };
                                Ok(pairs.on_reply(i, usize::from(j), ports, now))
                            }
                        },
                    };
                    let outcome = match verdict {
                        Err(w) => {
                            pairs.count_wrong(w);
                            Outcome::Wrong(w)
                        }
                        Ok(v) => {
                            if let Some(req) = v.resend {
                                let n = format.encode(&req, &mut req_buf);
                                peers.queue(i, &req_buf[..n]);
                            }
                            v.outcome
                        }
                    };
                    match outcome {
                        Outcome::Completed { latency, measured } => {
                            if now >= window.0 && now < window.1 {
                                window_completed += 1;
                            }
                            hist_all.saturating_record(latency.max(1));
                            if measured {
                                hist.saturating_record(latency.max(1));
                            }
                        }
                        Outcome::Wrong(kind) if first_wrong.is_none() => {
                            let mut bytes = [0u8; RECV_LEN];
                            bytes[..data.len()].copy_from_slice(data);
                            first_wrong = Some(WrongSample {
                                kind,
                                at: peers.addrs[i],
                                bytes,
                                len,
                            });
                        }
                        _ => {}
                    }
                }
                if n < BATCH {
                    break; // a short batch emptied the queue
                }
            }
        }
    }
    peers.flush();
    progress.finish();

    let cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        (Some(a), None) => sys::thread_cpu_time().saturating_sub(a),
        _ => Duration::ZERO,
    };
    let (window, scheduled, unsent, warmup_skipped) = match &schedule {
        Some((sched, warm_end, end)) => (
            Duration::from_nanos(end.saturating_sub(*warm_end)),
            sched.scheduled_between(*warm_end, *end),
            sched
                .scheduled_between(sched.start(), *end)
                .map_or(0, |n| n.saturating_sub(sched.issued())),
            warmup_skipped,
        ),
        None => (Duration::ZERO, None, 0, 0),
    };
    Ok(Results {
        load: cfg.load,
        window,
        scheduled,
        measured: pairs.measured,
        window_completed,
        all: pairs.all,
        wrong: pairs.wrong,
        histogram: hist,
        unsent,
        warmup_skipped,
        slot_waits,
        bad_sent,
        pending_sent,
        stray,
        send_failed: peers.send_failed,
        cpu,
        cpu_total: sys::cpu_time(),
        first_wrong,
        sockets: cfg.sockets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_split_the_id_space() {
        // Each thread's pairs and preload start in its own part of the
        // 32-bit space, pairs in the lower half, preload in the upper.
        for of in [1usize, 2, 3, 4, 64] {
            let bits = usize::BITS - (of - 1).leading_zeros();
            let part = 1u64 << (32 - bits.min(31));
            for index in 0..of {
                let t = Thread {
                    index,
                    of,
                    ..Thread::new(0, of)
                };
                for random in [0u32, 1, 0x7fff_ffff, u32::MAX] {
                    let (pairs, pending) = t.id_bases(random);
                    let start = index as u64 * part;
                    assert!(
                        (start..start + part / 2).contains(&u64::from(pairs)),
                        "{of} {index}"
                    );
                    let p = u64::from(pending);
                    assert!(
                        (start + part / 2 - 1..start + part).contains(&p),
                        "{of} {index}"
                    );
                    assert_eq!(pending % 2, 0);
                }
            }
        }
    }
}
