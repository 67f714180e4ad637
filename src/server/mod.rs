//! The server process: its configuration, the sockets it binds, the worker
//! that serves them, and the controls a running server answers to.
//!
//! Files, by what they hold:
//! - `mod.rs` (this one): [`ServerConfig`], [`Server::bind`] (validates the
//!   configuration, allocates every table, binds the sockets), the
//!   [`ShutdownHandle`] and reload hooks, and [`Server::run`];
//! - `worker.rs`: one worker's single-threaded `mio` loop over its sockets,
//!   with its own engine, rate limiter, receive batches and send queues;
//! - `ratelimit.rs`: the per-source token buckets the loop applies first
//!   (also reachable as `psync::limit`).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use mio::{Interest, Poll, Token, Waker};

use crate::engine::{ConfigError, Engine, EngineConfig};
use crate::metrics::Metrics;
use crate::stats::{Counters, IoCounters};
use crate::sys::{self, RecvBatch, SendQueue};
use ratelimit::{RateLimit, RateLimiter};
use worker::{Endpoint, Worker, QUEUE_BATCHES, WAKER};

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
    worker: Worker,
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
            worker: Worker {
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
            },
        })
    }

    /// The bound addresses (with the real port when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.worker
            .endpoints
            .iter()
            .filter(|e| !e.stun_only)
            .map(|e| e.local)
            .collect()
    }

    /// The `--stun-port` addresses, one per bound address (empty without it).
    pub fn stun_addrs(&self) -> Vec<SocketAddr> {
        self.worker
            .endpoints
            .iter()
            .filter(|e| e.stun_only)
            .map(|e| e.local)
            .collect()
    }

    /// The metrics endpoint's address, when `--metrics` was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.worker.metrics.as_ref().map(|m| m.local_addr())
    }

    /// Adds a hook that [`ShutdownHandle::reload`] (SIGHUP) runs. Hooks run
    /// in the order added; with none, a reload logs that there was nothing
    /// to reload.
    pub fn on_reload(&mut self, hook: ReloadHook) {
        self.worker.reload_hooks.push(hook);
    }

    /// A handle to stop [`Server::run`] from another thread or a signal thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            flag: self.worker.stop.clone(),
            reload: self.worker.reload.clone(),
            report: self.worker.report.clone(),
            waker: self.worker.waker.clone(),
        }
    }

    /// The counters now, gauges included.
    pub fn counters(&mut self) -> Counters {
        self.worker.counters()
    }

    /// Bytes allocated by the engine's tables.
    pub fn table_bytes(&self) -> usize {
        self.worker.engine.allocated_bytes()
    }

    /// Runs until [`ShutdownHandle::shutdown`]; returns the final counters.
    pub fn run(&mut self) -> io::Result<Counters> {
        self.worker.run()
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
