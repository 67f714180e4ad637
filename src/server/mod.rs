//! The server process: its configuration, the sockets it binds, the workers
//! that serve them, and the control thread that runs them.
//!
//! Files, by what they hold:
//! - `mod.rs` (this one): [`ServerConfig`]; [`Server::bind`], which checks
//!   the configuration, allocates every worker's tables and binds every
//!   socket; [`Server::run`], which starts the workers and then acts as the
//!   control thread; the [`ShutdownHandle`] and reload hooks;
//! - `worker.rs`: one worker's single-threaded `mio` loop;
//! - `steering.rs`: the classic BPF program that sends both halves of a
//!   pair to the same worker, and its Rust twin;
//! - `shares.rs`: how the per-source limits hold across workers;
//! - `ratelimit.rs`: the per-source token buckets (also `psync::limit`);
//! - `gate.rs`: the admission gate the loop applies next: seed or v2,
//!   `--require-auth`, tokens, address-validation cookies.
//!
//! **Workers.** With `workers` = N, each address (and the `--stun-port`) is
//! bound by N sockets that form one `SO_REUSEPORT` group, bound together
//! before any serves; the main groups get the steering program, the STUN
//! group keeps the kernel's hash (any worker can answer STUN). Worker `k`
//! owns socket `k` of every group and runs its own loop, engine (with
//! `capacity / N` of the pairs, one more for the first `capacity % N`), rate
//! limiter and counters; nothing on the packet path is shared. The kernel
//! renumbers a group when a socket leaves it, so the server keeps a
//! duplicate of every socket until all workers have stopped: no socket
//! leaves a group while another worker serves.
//!
//! **The control thread** (the thread that calls [`Server::run`]) carries
//! what is not per packet: the stop, reload and report flags of the
//! [`ShutdownHandle`]; the periodic stats line (the sums); the coordinator of
//! limit shares (`shares.rs`), which workers reach through a bounded channel
//! they never block on; and the watch on the workers: one that stops early
//! (a panic) stops them all and makes `run` return an error. The metrics
//! endpoint runs on a thread of its own, from the counters each worker
//! publishes between batches.
//!
//! **Cluster mode** (`--cluster-*`): worker 0 owns the cluster socket
//! (membership, heartbeats, DNS) and hands each forwarded request to the
//! worker that owns its pair, found with the steering program's twin,
//! through a bounded queue per worker (docs/cluster.md, "Decisions"); every
//! worker forwards and relays with a lane of its own (its own sequence
//! numbers and a duplicate of the cluster socket).

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Interest, Poll, Token, Waker};

use crate::cluster::{self, ClusterPort, ClusterSettings};
use crate::engine::source::SourceLimits;
use crate::engine::{ConfigError, Engine, EngineConfig};
use crate::metrics::{MetricsServer, Snapshot, WorkerLoad, STALLED};
use crate::stats::{Counters, IoCounters, WaitHistogram};
use crate::sys::{self, RecvBatch, SendQueue};
use gate::{AuthConfig, Gate};
use ratelimit::{Rate, RateLimit, RateLimiter};
use shares::{Coordinator, Limited, Measure, NoteFilter, Order};
use steering::{Keys, Steering};
use worker::{
    ClusterParts, Endpoint, Kind, Link, Worker, CLUSTER, HANDOFF_QUEUE, NOTES_PER_BATCH,
    QUEUE_BATCHES, WAKER,
};

pub mod gate;
pub mod ratelimit;
mod shares;
pub mod steering;
mod worker;

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
    /// Worker threads, each with its own loop, sockets and share of the
    /// tables (`--workers`; 1 to [`MAX_WORKERS`]).
    pub workers: usize,
    /// Run as a member of a cluster (docs/cluster.md).
    pub cluster: Option<ClusterSettings>,
    /// Protocol v2: token keys, `--require-auth`, the cookie secret.
    pub auth: AuthConfig,
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
            workers: 1,
            cluster: None,
            auth: AuthConfig::default(),
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
    /// `--workers` out of range.
    #[error("--workers must be between 1 and {MAX_WORKERS}, got {0}")]
    Workers(usize),
    /// More than one worker where steering is not available.
    #[error(
        "--workers {0}: this build serves one worker only (it uses the portable I/O fallback, \
         or this system has no SO_REUSEPORT steering); use --workers 1"
    )]
    WorkersUnsupported(usize),
    /// Fewer pairs than workers.
    #[error(
        "--capacity {capacity} is below --workers {workers}: each worker needs room for a pair"
    )]
    CapacityBelowWorkers {
        /// The capacity asked for.
        capacity: usize,
        /// The workers asked for.
        workers: usize,
    },
    /// The kernel refused the steering program.
    #[error("cannot steer {addr} across --workers: {source}")]
    Steering {
        /// The address of the group.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// A cluster setting is wrong.
    #[error(transparent)]
    Cluster(#[from] cluster::ConfigError),
    /// The cluster socket cannot be bound.
    #[error("--cluster-bind {addr}: {source}")]
    ClusterBind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// Cluster mode with more workers than lanes.
    #[error("--workers {0}: cluster mode serves at most 255 workers")]
    ClusterWorkers(usize),
    /// The auth settings cannot be used.
    #[error("{0}")]
    Auth(String),
    /// Setting up the poller failed.
    #[error("cannot set up the event loop: {0}")]
    Poll(#[from] io::Error),
}

/// Largest `--batch`: beyond this, batching buys nothing and delays replies.
pub const MAX_BATCH: usize = 1024;
/// Most `--workers`.
pub const MAX_WORKERS: usize = 256;
/// True where more than one worker can be steered: Linux with the batched
/// I/O (`SO_ATTACH_REUSEPORT_CBPF`).
pub const STEERING: bool = cfg!(all(target_os = "linux", not(feature = "portable-io")));
/// The control thread looks at its flags and its workers at least this often.
const TICK: Duration = Duration::from_millis(100);
/// Room in the channel from the workers to the control thread.
const EVENTS: usize = 4096;
/// How long a report (SIGUSR1) or a scrape waits for the workers' fresh
/// counters.
const FRESH_WAIT: Duration = Duration::from_millis(200);
/// How long a reload waits for every worker to put its change in force
/// before it logs what it reloaded.
const APPLY_WAIT: Duration = Duration::from_secs(1);
/// Events the control thread takes per turn before it looks at its flags.
const EVENTS_PER_TURN: usize = 1024;

/// What `--workers auto` means: the CPUs this process may run on (its
/// affinity mask, lowered to its cgroup's CPU quota where one is set), at
/// most [`MAX_WORKERS`].
pub fn available_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

/// What a worker publishes between batches for the control and metrics
/// threads.
#[derive(Clone, Debug, Default)]
struct WorkerState {
    counters: Counters,
    wait: WaitHistogram,
    capacity: usize,
    replay_entries: usize,
    /// When its loop last turned; `None` before it started.
    turned: Option<Instant>,
    /// Publications so far.
    generation: u64,
    /// Cluster mode: members, their liveness, refusals by reason.
    cluster: Option<crate::cluster::ClusterStatus>,
}

/// What the threads of one server share: flags, and each worker's
/// published state (a mutex held only for a copy).
struct Shared {
    stop: AtomicBool,
    reload: AtomicBool,
    report: AtomicBool,
    start: Instant,
    states: Box<[Mutex<WorkerState>]>,
}

impl Shared {
    fn states(&self) -> Vec<WorkerState> {
        self.states
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// From a worker (or the handle) to the control thread.
enum Event {
    /// A worker refused a source because of its share of a limit.
    Want { worker: usize, what: Limited },
    /// A worker's answer to a measure order.
    Measured {
        worker: usize,
        round: u64,
        what: Limited,
        value: Measure,
    },
    /// Look at the flags and the workers.
    Wake,
}

/// From the control thread to one worker.
enum Control {
    Order(Order),
    Reload(Apply),
    /// Publish the counters now.
    Publish,
}

/// What a reload's change is applied to, in each worker between batches.
#[non_exhaustive]
pub struct ReloadTarget<'a> {
    /// The worker's engine.
    pub engine: &'a mut Engine,
    /// The worker's admission gate (its v2 keys).
    pub gate: &'a mut Gate,
    /// Which worker (0 to `workers - 1`).
    pub worker: usize,
}

/// A change a reload hook prepared, applied to every worker.
pub type Apply = Arc<dyn Fn(&mut ReloadTarget<'_>) + Send + Sync>;

/// What a reload (SIGHUP) runs, once, in the control thread: it reads what
/// it must (a key file, say) and returns what it reloaded (logged at info)
/// with the change to apply to every worker, or why it kept the old state
/// (`Err`, logged as a warning; nothing is applied).
pub type ReloadHook = Box<dyn FnMut() -> Result<(String, Apply), String> + Send>;

/// A handle that controls a running [`Server`] from another thread (the
/// binary's signal thread): each call sets a flag and wakes whoever acts on
/// it (the workers for a shutdown, the control thread for the rest).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wakers: Arc<[Arc<Waker>]>,
    events: SyncSender<Event>,
}

impl ShutdownHandle {
    /// Asks every worker to finish the batch in hand and [`Server::run`] to
    /// return the summed counters (SIGINT, SIGTERM, SIGQUIT).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        for w in self.wakers.iter() {
            // If a wake fails the worker still sees the flag within a heartbeat.
            let _ = w.wake();
        }
        let _ = self.events.try_send(Event::Wake);
    }

    /// Asks the control thread to run the reload hooks ([`Server::on_reload`]) (SIGHUP).
    pub fn reload(&self) {
        self.shared.reload.store(true, Ordering::Release);
        let _ = self.events.try_send(Event::Wake);
    }

    /// Asks the control thread to log the summed counters now, at info level
    /// on the [`crate::cli::REPORT_TARGET`] target (SIGUSR1).
    pub fn report(&self) {
        self.shared.report.store(true, Ordering::Release);
        let _ = self.events.try_send(Event::Wake);
    }
}

/// The metrics thread, once started.
struct MetricsThread {
    exit: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: JoinHandle<io::Result<()>>,
}

/// A bound, ready server. [`Server::run`] drives it.
pub struct Server {
    /// Until `run` starts them.
    workers: Vec<Worker>,
    wakers: Arc<[Arc<Waker>]>,
    controls: Vec<Sender<Control>>,
    events_tx: SyncSender<Event>,
    events: Receiver<Event>,
    shared: Arc<Shared>,
    /// A duplicate of every worker socket, kept until every worker has
    /// stopped: a socket that left its group early would renumber it.
    _group: Vec<std::net::UdpSocket>,
    metrics: Option<MetricsServer>,
    metrics_addr: Option<SocketAddr>,
    udp_sockets: usize,
    local_addrs: Vec<SocketAddr>,
    stun_addrs: Vec<SocketAddr>,
    steering: Option<Steering>,
    coordinator: Coordinator,
    stats_interval: Option<Duration>,
    reload_hooks: Vec<ReloadHook>,
    /// `--auth-key-file`, read again on SIGHUP.
    key_file: Option<std::path::PathBuf>,
    cluster_addr: Option<SocketAddr>,
    table_bytes: usize,
    /// Each worker's final counters, once `run` has returned.
    finals: Vec<Counters>,
}

/// Each limit divided among `workers`, rounded up (0 stays "no limit").
fn share_limits(l: SourceLimits, workers: usize) -> SourceLimits {
    let w = workers as u32;
    SourceLimits {
        per_ip: l.per_ip.div_ceil(w),
        v4_24: l.v4_24.div_ceil(w),
        v6_56: l.v6_56.div_ceil(w),
        v6_48: l.v6_48.div_ceil(w),
    }
}

/// 128 bits for a key: from the seed when one is configured (reproducible
/// runs), else from the OS.
fn key_bits(seed: Option<u64>, salt: u64) -> Result<u128, ServerError> {
    match seed {
        // Two splitmix64 steps: well-mixed keys even from a seed like 7.
        Some(s) => Ok(u128::from(splitmix64(s ^ salt)) << 64
            | u128::from(splitmix64(s ^ salt ^ 0x5851_f42d_4c95_7f2d))),
        None => {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b)
                .map_err(|e| ServerError::Poll(io::Error::other(e.to_string())))?;
            Ok(u128::from_le_bytes(b))
        }
    }
}

impl Server {
    /// Validates `cfg`, allocates every worker's tables and buffers, and
    /// binds the sockets (no thread starts before [`Server::run`]).
    pub fn bind(cfg: &ServerConfig) -> Result<Server, ServerError> {
        if cfg.batch == 0 || cfg.batch > MAX_BATCH {
            return Err(ServerError::Batch(cfg.batch));
        }
        let n = cfg.workers;
        if n == 0 || n > MAX_WORKERS {
            return Err(ServerError::Workers(n));
        }
        if n > 1 && !STEERING {
            return Err(ServerError::WorkersUnsupported(n));
        }
        if let Some(settings) = &cfg.cluster {
            settings.config.validate()?;
            // Each worker sends on a lane of its own; lane 0 is the heartbeats'.
            if n > usize::from(u8::MAX) {
                return Err(ServerError::ClusterWorkers(n));
            }
        }
        let v4 = cfg.bind.iter().filter(|a| a.is_ipv4()).count();
        let v6 = cfg.bind.iter().filter(|a| a.is_ipv6()).count();
        if v4 > 1 || v6 > 1 || v4 + v6 == 0 {
            return Err(ServerError::Bind);
        }
        let mut whole = cfg.engine.clone();
        whole.ipv4 = v4 == 1;
        whole.ipv6 = v6 == 1;
        whole.validate()?;
        if whole.capacity < n {
            return Err(ServerError::CapacityBelowWorkers {
                capacity: whole.capacity,
                workers: n,
            });
        }
        let memory_error = |e: ConfigError| match e {
            ConfigError::Memory { .. } => ConfigError::Memory {
                capacity: whole.capacity,
                bytes: whole.memory(),
            },
            e => e,
        };
        let mut engines = Vec::with_capacity(n);
        for k in 0..n {
            let mut c = whole.clone();
            c.capacity = whole.capacity / n + usize::from(k < whole.capacity % n);
            c.limits = share_limits(whole.limits, n);
            // Worker 0 keeps the seed as given; the others derive theirs.
            c.seed = whole.seed.map(|s| {
                if k == 0 {
                    s
                } else {
                    splitmix64(s ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                }
            });
            engines.push(Engine::new(&c).map_err(memory_error)?);
        }
        let table_bytes = engines.iter().map(Engine::allocated_bytes).sum();

        let polls = (0..n)
            .map(|_| Poll::new())
            .collect::<io::Result<Vec<_>>>()?;
        let wakers = polls
            .iter()
            .map(|p| Waker::new(p.registry(), WAKER).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let steering = (n > 1).then(|| {
            key_bits(whole.seed, 0x7374_6565_7269_6e67)
                .map(|bits| Steering::new(n as u32, Keys::from_bits(bits)))
        });
        let steering = steering.transpose()?;
        let stun_binds = cfg
            .stun_port
            .into_iter()
            .flat_map(|port| cfg.bind.iter().map(move |a| SocketAddr::new(a.ip(), port)));
        let binds: Vec<(SocketAddr, Kind)> = cfg
            .bind
            .iter()
            .map(|&a| (a, Kind::Main))
            .chain(stun_binds.map(|a| (a, Kind::Stun)))
            .collect();
        let mut endpoints: Vec<Vec<Endpoint>> = (0..n).map(|_| Vec::new()).collect();
        let mut group_fds = Vec::new();
        let (mut local_addrs, mut stun_addrs) = (Vec::new(), Vec::new());
        for &(addr, kind) in &binds {
            let group = sys::bind_udp_group(addr, n, cfg.rcvbuf, cfg.sndbuf).map_err(|source| {
                if source.kind() == io::ErrorKind::AddrInUse && kind == Kind::Stun {
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
            let buffers = group[0].1;
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
            let local = group[0].0.local_addr()?;
            #[cfg(target_os = "linux")]
            if let (Some(s), Kind::Main) = (steering.as_ref(), kind) {
                sys::attach_reuseport_cbpf(&group[0].0, &s.program()).map_err(|source| {
                    ServerError::Steering {
                        addr: local,
                        source,
                    }
                })?;
            }
            match kind {
                Kind::Main => local_addrs.push(local),
                Kind::Stun => stun_addrs.push(local),
            }
            for (k, (std_socket, _)) in group.into_iter().enumerate() {
                group_fds.push(std_socket.try_clone()?);
                let mut socket = mio::net::UdpSocket::from_std(std_socket);
                polls[k].registry().register(
                    &mut socket,
                    Token(endpoints[k].len()),
                    Interest::READABLE,
                )?;
                endpoints[k].push(Endpoint {
                    socket,
                    local,
                    recv: RecvBatch::new(cfg.batch),
                    queue: SendQueue::new(cfg.batch * 2 * QUEUE_BATCHES, cfg.batch),
                    // Data may have arrived between bind and register.
                    readable: true,
                    watch_writable: false,
                    kind,
                });
            }
        }
        let metrics = match cfg.metrics {
            Some(addr) => Some(
                MetricsServer::bind(addr)
                    .map_err(|source| ServerError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            reload: AtomicBool::new(false),
            report: AtomicBool::new(false),
            start: Instant::now(),
            states: (0..n).map(|_| Mutex::new(WorkerState::default())).collect(),
        });
        // Cluster mode: worker 0 owns the cluster socket; every worker
        // sends with a lane of its own (lane k + 1), and worker 0 hands each
        // forwarded request to the worker that owns its pair.
        let mut cluster = match &cfg.cluster {
            Some(settings) => {
                let addr = settings.config.bind;
                Some(
                    ClusterPort::bind(
                        settings,
                        (cfg.rcvbuf, cfg.sndbuf),
                        cfg.batch,
                        polls[0].registry(),
                        CLUSTER,
                        wakers[0].clone(),
                        0,
                    )
                    .map_err(|source| ServerError::ClusterBind { addr, source })?,
                )
            }
            None => None,
        };
        // The cookie secret is always drawn from the OS: cookies must not be
        // predictable even when --seed makes everything else reproducible.
        // One secret for every worker: a cookie is good wherever it lands.
        let mut cookie_secret = [0u8; 32];
        getrandom::fill(&mut cookie_secret)
            .map_err(|e| ServerError::Poll(io::Error::other(e.to_string())))?;
        let mut cparts: Vec<Option<ClusterParts>> = Vec::with_capacity(n);
        if let (Some(port), Some(settings)) = (cluster.as_ref(), cfg.cluster.as_ref()) {
            let addr = settings.config.bind;
            let mut handoff = vec![None];
            let mut inboxes = vec![None];
            for waker in wakers.iter().skip(1) {
                let (tx, rx) = mpsc::sync_channel(HANDOFF_QUEUE);
                handoff.push(Some((tx, waker.clone())));
                inboxes.push(Some(rx));
            }
            for (k, inbox) in inboxes.into_iter().enumerate() {
                let lane = port
                    .lane(u8::try_from(k + 1).unwrap_or(u8::MAX), cfg.batch)
                    .map_err(|source| ServerError::ClusterBind { addr, source })?;
                cparts.push(Some(ClusterParts {
                    lane,
                    steering: if k == 0 { steering } else { None },
                    handoff: if k == 0 {
                        std::mem::take(&mut handoff)
                    } else {
                        Vec::new()
                    },
                    inbox,
                    drain: settings.drain,
                }));
            }
        } else {
            cparts.resize_with(n, || None);
        }
        let (events_tx, events) = mpsc::sync_channel(EVENTS);
        let mut controls = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for (k, ((poll, engine), endpoints)) in
            polls.into_iter().zip(engines).zip(endpoints).enumerate()
        {
            let (control_tx, control) = mpsc::channel();
            controls.push(control_tx);
            let seed = key_bits(whole.seed, 0x6c69_6d69_7465_7200 ^ k as u64)?;
            let limiter_seed = [(seed >> 64) as u64, seed as u64];
            let limiter = RateLimiter::new(cfg.rate_limit, limiter_seed).map(|mut l| {
                l.shared_by(n as u32);
                l
            });
            let gate_seed = [
                splitmix64(limiter_seed[0] ^ 1),
                splitmix64(limiter_seed[1] ^ 2),
            ];
            let mut gate = Gate::new(&cfg.auth, cfg.rate_limit, gate_seed, &cookie_secret)
                .map_err(ServerError::Auth)?;
            gate.shared_by(n as u32);
            workers.push(Worker {
                index: k,
                poll,
                endpoints,
                engine,
                limiter,
                whole_pending: whole.limits,
                shared_limits: n > 1,
                io: IoCounters::default(),
                for_engine: vec![None; cfg.batch].into_boxed_slice(),
                gate,
                v2_in: Vec::with_capacity(cfg.batch),
                cluster: if k == 0 { cluster.take() } else { None },
                cparts: cparts[k].take(),
                notes: Vec::with_capacity(NOTES_PER_BATCH),
                refused: Vec::with_capacity(NOTES_PER_BATCH),
                note_filter: NoteFilter::default(),
                batch: cfg.batch,
                mono_base: sys::monotonic_ms()
                    .saturating_sub(shared.start.elapsed().as_millis() as u64),
                link: Link {
                    control,
                    events: events_tx.clone(),
                    shared: shared.clone(),
                },
                generation: 0,
            });
        }
        let cluster_addr = workers[0]
            .cluster
            .as_ref()
            .and_then(|c| c.local_addr().ok());
        let rate = (cfg.rate_limit.per_second > 0).then_some(Rate {
            per_second: cfg.rate_limit.per_second,
            burst: cfg.rate_limit.burst.max(1),
        });
        Ok(Server {
            workers,
            wakers: wakers.into(),
            controls,
            events_tx,
            events,
            shared,
            _group: group_fds,
            metrics_addr: metrics.as_ref().map(MetricsServer::local_addr),
            metrics,
            udp_sockets: binds.len() * n,
            local_addrs,
            stun_addrs,
            steering,
            coordinator: Coordinator::new(n, rate, whole.limits),
            stats_interval: cfg.stats_interval,
            reload_hooks: Vec::new(),
            key_file: cfg.auth.key_file.clone(),
            cluster_addr,
            table_bytes,
            finals: Vec::new(),
        })
    }

    /// The bound addresses (with the real port when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// The `--stun-port` addresses, one per bound address (empty without it).
    pub fn stun_addrs(&self) -> Vec<SocketAddr> {
        self.stun_addrs.clone()
    }

    /// The cluster socket's address, in cluster mode.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_addr
    }

    /// The metrics endpoint's address, when `--metrics` was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Worker threads (`--workers`).
    pub fn workers(&self) -> usize {
        self.wakers.len()
    }

    /// The steering function of the main sockets' groups, with more than
    /// one worker: which worker a request goes to (for tests and tools that
    /// know the seed).
    pub fn steering(&self) -> Option<Steering> {
        self.steering
    }

    /// Adds a hook that [`ShutdownHandle::reload`] (SIGHUP) runs. Hooks run
    /// in the order added; with none, a reload logs that there was nothing
    /// to reload.
    pub fn on_reload(&mut self, hook: ReloadHook) {
        self.reload_hooks.push(hook);
    }

    /// A handle to stop [`Server::run`] from another thread or a signal thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
            wakers: self.wakers.clone(),
            events: self.events_tx.clone(),
        }
    }

    /// The counters summed over the workers: as last published while
    /// running, the final ones after [`Server::run`].
    pub fn counters(&self) -> Counters {
        let mut sum = Counters::default();
        for c in self.worker_counters() {
            sum.add(&c);
        }
        sum
    }

    /// Each worker's counters, in worker order (see [`Server::counters`]).
    pub fn worker_counters(&self) -> Vec<Counters> {
        if self.finals.is_empty() {
            self.shared.states().iter().map(|s| s.counters).collect()
        } else {
            self.finals.clone()
        }
    }

    /// Bytes allocated by the engines' tables, all workers together.
    pub fn table_bytes(&self) -> usize {
        self.table_bytes
    }

    /// Starts the workers (and the metrics thread) and runs the control
    /// thread until [`ShutdownHandle::shutdown`]; returns the final counters,
    /// summed over the workers. A worker that panics or fails stops the
    /// others, and `run` returns an error that says which and why.
    pub fn run(&mut self) -> io::Result<Counters> {
        let workers = std::mem::take(&mut self.workers);
        if workers.is_empty() {
            return Err(io::Error::other("this server has run already"));
        }
        let mut threads = Vec::with_capacity(workers.len());
        let mut failure = None;
        for mut w in workers {
            let wake = self.events_tx.clone();
            let index = w.index;
            let spawned = std::thread::Builder::new()
                .name(format!("psync-worker-{index}"))
                .spawn(move || {
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| w.run()));
                    let _ = wake.try_send(Event::Wake);
                    result
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    failure = Some(format!("cannot start worker {index}: {e}"));
                    break;
                }
            }
        }
        // The metrics thread answers once every worker turns (until then
        // its connections wait in the listener's backlog), so that /readyz
        // never says ready before the workers are.
        let mut metrics = None;
        if failure.is_none() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.shared.states().iter().any(|s| s.turned.is_none())
                && !threads.iter().any(|t| t.is_finished())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(m) = self.metrics.take() {
                match self.start_metrics(m) {
                    Ok(m) => metrics = Some(m),
                    Err(e) => failure = Some(format!("cannot start the metrics thread: {e}")),
                }
            }
        }
        if failure.is_none() {
            self.control(&threads);
        }
        self.shared.stop.store(true, Ordering::Release);
        for w in self.wakers.iter() {
            let _ = w.wake();
        }
        let states = self.shared.states();
        let mut finals = Vec::with_capacity(threads.len());
        for (k, t) in threads.into_iter().enumerate() {
            let why = match t.join() {
                Ok(Ok(Ok(c))) => {
                    finals.push(c);
                    continue;
                }
                Ok(Ok(Err(e))) => format!("worker {k}: its event loop failed: {e}"),
                Ok(Err(panic)) | Err(panic) => {
                    format!("worker {k} panicked: {}", panic_text(&panic))
                }
            };
            finals.push(states[k].counters);
            failure.get_or_insert(why);
        }
        if let Some(m) = metrics {
            m.exit.store(true, Ordering::Release);
            let _ = m.waker.wake();
            let _ = m.thread.join();
        }
        self.finals = finals;
        match failure {
            Some(why) => Err(io::Error::other(format!(
                "{why}; the other workers were stopped"
            ))),
            None => Ok(self.counters()),
        }
    }

    fn start_metrics(&self, m: MetricsServer) -> io::Result<MetricsThread> {
        let exit = Arc::new(AtomicBool::new(false));
        let waker = m.waker();
        let shared = self.shared.clone();
        let udp_sockets = self.udp_sockets;
        let flag = exit.clone();
        let workers = self.workers_link();
        let thread = std::thread::Builder::new()
            .name("psync-metrics".into())
            .spawn(move || {
                m.run(
                    || {
                        workers.fresh();
                        snapshot(&shared, udp_sockets)
                    },
                    &flag,
                )
            })?;
        Ok(MetricsThread {
            exit,
            waker,
            thread,
        })
    }

    /// The control thread's loop: until a stop, or a worker that ends early.
    fn control<T>(&mut self, threads: &[JoinHandle<T>]) {
        let mut orders = Vec::new();
        let mut next_stats = self.stats_interval.map(|d| Instant::now() + d);
        loop {
            let now = Instant::now();
            let mut wait = TICK;
            if let Some(t) = next_stats {
                wait = wait.min(t.saturating_duration_since(now));
            }
            if let Some(d) = self.coordinator.next_deadline() {
                let ms = d.saturating_sub(self.shared.now_ms());
                wait = wait.min(Duration::from_millis(ms));
            }
            let first = self.events.recv_timeout(wait).ok();
            for event in first
                .into_iter()
                .chain(std::iter::from_fn(|| self.events.try_recv().ok()).take(EVENTS_PER_TURN))
            {
                let now_ms = self.shared.now_ms();
                match event {
                    Event::Want { worker, what } => {
                        self.coordinator.want(worker, what, now_ms, &mut orders)
                    }
                    Event::Measured {
                        worker,
                        round,
                        what,
                        value,
                    } => self
                        .coordinator
                        .measured(worker, round, what, value, now_ms, &mut orders),
                    Event::Wake => {}
                }
            }
            self.coordinator.tick(self.shared.now_ms(), &mut orders);
            self.deliver(&mut orders);
            if self.shared.stop.load(Ordering::Acquire) || threads.iter().any(|t| t.is_finished()) {
                return;
            }
            if self.shared.report.swap(false, Ordering::AcqRel) {
                self.fresh_counters();
                info!(target: crate::cli::REPORT_TARGET, "counters {}", self.counters());
                self.log_split(crate::cli::REPORT_TARGET);
            }
            if self.shared.reload.swap(false, Ordering::AcqRel) {
                self.reload();
            }
            if let Some(due) = next_stats {
                let now = Instant::now();
                if now >= due {
                    let cluster = self
                        .shared
                        .states()
                        .first()
                        .and_then(|s| s.cluster.as_ref().map(cluster_line))
                        .unwrap_or_default();
                    info!("stats {}{cluster}", self.counters());
                    self.log_split(module_path!());
                    next_stats = self.stats_interval.map(|d| now + d);
                }
            }
        }
    }

    /// Asks every worker to publish its counters now and waits for them.
    fn fresh_counters(&self) {
        self.workers_link().fresh();
    }

    /// With more than one worker, each one's `received` and `matched`.
    fn log_split(&self, target: &str) {
        if self.workers() < 2 {
            return;
        }
        let split = self.worker_counters();
        let list = |f: fn(&Counters) -> u64| {
            split
                .iter()
                .map(|c| f(c).to_string())
                .collect::<Vec<_>>()
                .join("/")
        };
        info!(
            target: target,
            "per worker: received {}, matched {}",
            list(|c| c.received),
            list(|c| c.engine.matched)
        );
    }

    /// Sends the coordinator's orders, waking each worker once.
    fn deliver(&self, orders: &mut Vec<(usize, Order)>) {
        let mut woken = vec![false; self.controls.len()];
        for (w, order) in orders.drain(..) {
            if self.controls[w].send(Control::Order(order)).is_ok() && !woken[w] {
                woken[w] = true;
                let _ = self.wakers[w].wake();
            }
        }
    }

    /// Re-reads the key file (once) and runs the reload hooks, and sends
    /// their changes to every worker.
    fn reload(&mut self) {
        if self.reload_hooks.is_empty() && self.key_file.is_none() {
            info!(target: crate::cli::REPORT_TARGET, "reload: nothing to reload");
        }
        if let Some(path) = &self.key_file {
            match gate::reload_key_file(path) {
                Ok((keys, what)) => {
                    let apply: Apply = Arc::new(move |t| t.gate.set_keys(keys.clone()));
                    self.apply_everywhere(&apply);
                    info!(target: crate::cli::REPORT_TARGET, "reload: {what}");
                }
                Err(why) => warn!("reload failed, keeping the old auth keys: {why}"),
            }
        }
        let mut changes = Vec::new();
        for hook in &mut self.reload_hooks {
            match hook() {
                Ok((what, apply)) => {
                    changes.push(apply);
                    info!(target: crate::cli::REPORT_TARGET, "reload: {what}");
                }
                Err(why) => warn!("reload failed, keeping the old state: {why}"),
            }
        }
        for apply in changes {
            self.apply_everywhere(&apply);
        }
    }

    /// Sends a change to every worker and waits until each has applied it
    /// (at most [`APPLY_WAIT`]), so that what the log then says is in force.
    fn apply_everywhere(&self, apply: &Apply) {
        self.workers_link()
            .ask(|| Control::Reload(apply.clone()), APPLY_WAIT);
    }

    fn workers_link(&self) -> Workers {
        Workers {
            controls: self.controls.clone(),
            wakers: self.wakers.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// What another thread needs to ask the workers for fresh counters.
struct Workers {
    controls: Vec<Sender<Control>>,
    wakers: Arc<[Arc<Waker>]>,
    shared: Arc<Shared>,
}

impl Workers {
    /// Asks every worker to publish its counters now and waits until each
    /// has, for at most [`FRESH_WAIT`] (a worker deep in a long turn is not
    /// waited for: its last copy serves). Workers answer between batches;
    /// none ever waits for this.
    fn fresh(&self) {
        self.ask(|| Control::Publish, FRESH_WAIT);
    }

    /// Sends `message()` to every worker and waits until each has published
    /// its counters since (every message it handles ends in a publication),
    /// for at most `wait`.
    fn ask(&self, message: impl Fn() -> Control, wait: Duration) {
        let before: Vec<u64> = self.shared.states().iter().map(|s| s.generation).collect();
        // A worker that has stopped takes no more orders: not waited for.
        let asked: Vec<bool> = self
            .controls
            .iter()
            .zip(self.wakers.iter())
            .map(|(control, waker)| {
                let sent = control.send(message()).is_ok();
                if sent {
                    let _ = waker.wake();
                }
                sent
            })
            .collect();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let states = self.shared.states();
            let done = (0..states.len()).all(|k| !asked[k] || states[k].generation > before[k]);
            if done {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The metrics page's view: the workers' published states, summed.
fn snapshot(shared: &Shared, udp_sockets: usize) -> Snapshot {
    let states = shared.states();
    let now = Instant::now();
    let mut s = Snapshot {
        uptime: shared.start.elapsed().as_secs_f64(),
        udp_sockets,
        stopping: shared.stop.load(Ordering::Acquire),
        starting: states.iter().any(|w| w.turned.is_none()),
        ..Snapshot::default()
    };
    let mut stalled: Option<(usize, Duration)> = None;
    for (k, w) in states.iter().enumerate() {
        s.counters.add(&w.counters);
        s.wait.add(&w.wait);
        s.capacity += w.capacity;
        s.replay_entries += w.replay_entries;
        s.workers.push(WorkerLoad {
            received: w.counters.received,
            matched: w.counters.engine.matched,
        });
        if let Some(t) = w.turned {
            let idle = now.saturating_duration_since(t);
            if idle > STALLED && stalled.map_or(true, |(_, d)| idle > d) {
                stalled = Some((k, idle));
            }
        }
    }
    s.stalled = stalled.map(|(k, d)| (k, d.as_secs_f64()));
    s.cluster = states.first().and_then(|w| w.cluster.clone());
    s
}

/// The cluster's part of the stats line: live members and how long ago
/// each was heard from.
fn cluster_line(s: &crate::cluster::ClusterStatus) -> String {
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

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
