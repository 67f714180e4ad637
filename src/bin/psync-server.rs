//! `psync-server`: the command line front end. Arguments (and `PSYNC_SERVER_*`
//! variables) become a [`ServerConfig`]; the library does the rest. Signals:
//! SIGINT, SIGTERM and SIGQUIT stop it with its final counters; SIGHUP
//! reloads; SIGUSR1 logs the counters; see docs/operations.md.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use log::LevelFilter;
use psync::cli::{self, Bare, Program};
use psync::cluster::config::{DnsName, HostPort};
use psync::cluster::{self, ClusterSettings};
use psync::limit::RateLimit;
use psync::{EngineConfig, Server, ServerConfig, ServerError};
use signal_hook::consts::signal::*;

const PROGRAM: Program = Program {
    name: "psync-server",
    env_prefix: "PSYNC_SERVER",
    version: env!("CARGO_PKG_VERSION"),
};

/// Largest --capacity: the engine's limit, 2^31 pairs (128 GiB of tables);
/// the engine then says in one line whether the memory can be had.
const MAX_TABLE: u64 = psync::engine::MAX_CAPACITY as u64;
/// Largest per-source pending limit: 2^24, far above any table a limit
/// would matter for.
const MAX_PER_SOURCE: i64 = 1 << 24;
/// Largest --rate-limit-sources: 2^24 sources (400 MiB of limiter).
const MAX_SOURCES: u64 = 1 << 24;

/// psync rendezvous server: lets two peers behind NAT learn each other's
/// public address. Each peer sends {self_id, peer_id} (8 bytes); when both
/// halves of a pair have arrived, each gets the other's address and two ports.
///
/// Durations take a unit (30s, 500ms, 2m, 1h); a bare number is seconds.
/// Every flag can also be set with the environment variable shown beside it.
#[derive(Parser, Debug)]
#[command(name = "psync-server")]
struct Args {
    /// Serve IPv4 only.
    #[arg(short = '4', long = "ipv4-only", conflicts_with = "ipv6_only")]
    ipv4_only: bool,

    /// Serve IPv6 only.
    #[arg(short = '6', long = "ipv6-only")]
    ipv6_only: bool,

    /// UDP port to listen on (0 picks a free one and prints it).
    #[arg(short, long, default_value_t = 1024)]
    port: u16,

    /// Address to bind instead of the wildcard; at most one per family
    /// (repeat the flag, or separate with commas).
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    bind: Vec<IpAddr>,

    /// More output: -v startup and periodic stats, -vv one line per match,
    /// -vvv one line per packet. RUST_LOG, when set, refines it.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,

    /// How long a registration waits for its partner [10ms to 1d].
    #[arg(long, default_value = "30s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(86_400), false))]
    ttl: Duration,

    /// How long a match's replies are resent to retransmitted requests [10ms to 1d].
    #[arg(long, default_value = "5s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(86_400), false))]
    replay_ttl: Duration,

    /// Most pairs held at once, waiting or remembered for replay (remembered
    /// ones give their slots to new registrations from three quarters of
    /// it on); tables of about 60 bytes per pair are allocated at start [1 to
    /// 2147483648].
    #[arg(long, default_value_t = 1 << 20, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=MAX_TABLE))]
    capacity: u64,

    /// Ignored (matches now share --capacity with waiting registrations);
    /// accepted so that old command lines keep working.
    #[arg(long, value_name = "N", hide = true)]
    replay_capacity: Option<u64>,

    /// Ports handed to peers, inclusive (at least two, none 0).
    #[arg(long, default_value = "1024-65535", value_name = "LO-HI", value_parser = psync::engine::parse_port_range)]
    port_range: (u16, u16),

    /// Datagrams per recvmmsg/sendmmsg call [1 to 1024].
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=psync::server::MAX_BATCH as i64))]
    batch: u16,

    /// Socket receive buffer (4194304, 512K, 4M; 0: kernel default) [0, or 4K to 1G].
    #[arg(long, default_value = "4M", value_name = "BYTES", value_parser = cli::size(4 << 10, 1 << 30, true))]
    rcvbuf: usize,

    /// Socket send buffer (0: kernel default) [0, or 4K to 1G].
    #[arg(long, default_value = "4M", value_name = "BYTES", value_parser = cli::size(4 << 10, 1 << 30, true))]
    sndbuf: usize,

    /// Time between stats lines at -v [0 (never), or 1s to 1d].
    #[arg(long, default_value = "10s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_secs(1), Duration::from_secs(86_400), true))]
    stats_interval: Duration,

    /// Datagrams per second allowed from one source (IPv4 address or IPv6
    /// /64); 0: no limit [0 to 10000000].
    #[arg(long, default_value_t = 100, value_name = "PPS",
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    rate_limit: u32,

    /// Datagrams a source may send at once before --rate-limit applies [1 to 10000000].
    #[arg(long, default_value_t = 200, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    burst: u32,

    /// Sources the rate limiter tracks at once, 24 bytes each [1 to 16777216].
    #[arg(long, default_value_t = 1 << 16, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=MAX_SOURCES))]
    rate_limit_sources: u64,

    /// Most registrations one IPv4 address or IPv6 /64 may hold pending; 0: no
    /// limit [0 to 16777216].
    #[arg(long, default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=MAX_PER_SOURCE))]
    max_pending_per_ip: u32,

    /// Most registrations one IPv4 /24 may hold pending; 0: no limit [0 to 16777216].
    #[arg(long, default_value_t = 2048, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=MAX_PER_SOURCE))]
    max_pending_per_v4_24: u32,

    /// Most registrations one IPv6 /56 may hold pending; 0: no limit [0 to 16777216].
    #[arg(long, default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=MAX_PER_SOURCE))]
    max_pending_per_v6_56: u32,

    /// Most registrations one IPv6 /48 may hold pending; 0: no limit [0 to
    /// 16777216]. With all four limits 0 no per-source counts are kept, and a
    /// full table refuses newcomers instead of making room by fairness.
    #[arg(long, default_value_t = 4096, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=MAX_PER_SOURCE))]
    max_pending_per_v6_48: u32,

    /// Serve HTTP on ADDR: /metrics (Prometheus), /healthz and /readyz
    /// (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Also answer STUN Binding requests (RFC 8489) on this UDP port. The main
    /// port answers them anyway; a second port lets psync-client tell whether
    /// its NAT keeps one public port for every destination [1 to 65535, not --port].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    stun_port: Option<u16>,

    /// Worker threads, each with its own loop, sockets and share of
    /// --capacity; the kernel steers both halves of a pair to the same one.
    /// `auto`: one per CPU this process may use. More than 1 needs Linux
    /// [1 to 256, or auto].
    #[arg(long, default_value = "1", value_name = "N|auto", value_parser = parse_workers)]
    workers: usize,

    /// Seed for port choice and hashing, for reproducible runs (default: from the OS).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,

    /// Serve protocol v2: accept tokens made with the keys in this file
    /// (lines `KEY_ID SECRET_HEX`, 1 to 256 keys of 16 to 64 bytes; others
    /// may not read it: mode 600). SIGHUP re-reads it. See docs/auth.md.
    #[arg(long, value_name = "PATH")]
    auth_key_file: Option<PathBuf>,

    /// Refuse seed-format requests (no reply, counted in seed_refused): only
    /// v2 requests with a valid token are served. Needs --auth-key-file.
    #[arg(long, requires = "auth_key_file")]
    require_auth: bool,

    /// Cluster: every member's cluster address, this server's included, the
    /// same list on every member (IP[:PORT], port from --cluster-bind; repeat,
    /// or separate with commas) [at most 256, one per IP].
    #[arg(long, value_name = "ADDR", value_delimiter = ',', conflicts_with = "cluster_dns",
          value_parser = cluster::config::parse_host_port)]
    cluster_peer: Vec<HostPort>,

    /// Cluster: the members are the A (or AAAA) records of NAME, re-resolved
    /// every --cluster-dns-interval (a Kubernetes headless Service) [a host
    /// name; PORT 1 to 65535, default --cluster-bind's].
    #[arg(long, value_name = "NAME[:PORT]", value_parser = cluster::config::parse_dns_name)]
    cluster_dns: Option<DnsName>,

    /// Cluster: how often --cluster-dns is resolved [100ms to 1h].
    #[arg(long, default_value = "5s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, cluster::config::MIN_DNS_INTERVAL, cluster::config::MAX_DNS_INTERVAL, false))]
    cluster_dns_interval: Duration,

    /// Cluster: this member's own address for the server-to-server socket,
    /// and its identity (IP[:PORT], port 1025 by default; not a wildcard).
    #[arg(long, value_name = "ADDR", value_parser = cluster::config::parse_host_port)]
    cluster_bind: Option<HostPort>,

    /// Cluster: file holding the key every member shares, in hex (16 to 64
    /// bytes; `openssl rand -hex 32`); a second line is also accepted
    /// (rotation). Never on the command line.
    #[arg(long, value_name = "PATH")]
    cluster_key_file: Option<PathBuf>,

    /// Cluster: a member silent this long stops owning pairs [200ms to 10m].
    #[arg(long, default_value = "3s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, cluster::config::MIN_TIMEOUT, cluster::config::MAX_TIMEOUT, false))]
    cluster_timeout: Duration,

    /// Cluster: after SIGTERM, how long to keep relaying (forwarding every
    /// request) once the others know this member leaves [0 to 10m].
    #[arg(long, default_value = "2s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(1), Duration::from_secs(600), true))]
    cluster_drain: Duration,
}

/// The cluster's settings from the flags, or `None` without
/// `--cluster-peer` and `--cluster-dns`. Errors name the flag.
fn cluster_settings(args: &Args) -> Result<Option<ClusterSettings>, String> {
    if args.cluster_peer.is_empty() && args.cluster_dns.is_none() {
        if args.cluster_bind.is_some() || args.cluster_key_file.is_some() {
            return Err(
                "--cluster-bind and --cluster-key-file need --cluster-peer or --cluster-dns".into(),
            );
        }
        return Ok(None);
    }
    let bind = args
        .cluster_bind
        .ok_or_else(|| cluster::ConfigError::NoBind.to_string())?
        .with_default(cluster::config::DEFAULT_PORT);
    let path = args
        .cluster_key_file
        .as_ref()
        .ok_or_else(|| cluster::ConfigError::NoKey.to_string())?;
    let members = match &args.cluster_dns {
        Some(dns) => cluster::MemberSource::Dns {
            name: dns.name.clone(),
            port: dns.port.unwrap_or(bind.port()),
            interval: args.cluster_dns_interval,
        },
        None => cluster::MemberSource::Static(
            args.cluster_peer
                .iter()
                .map(|p| p.with_default(bind.port()))
                .collect(),
        ),
    };
    let config = cluster::ClusterConfig {
        bind,
        members,
        timeout: args.cluster_timeout,
        key: cluster::config::read_key_file(path).map_err(|e| e.to_string())?,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(Some(ClusterSettings {
        config,
        drain: args.cluster_drain,
    }))
}

fn parse_workers(s: &str) -> Result<usize, String> {
    if s == "auto" {
        return Ok(psync::server::available_workers());
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=psync::server::MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a number of workers from 1 to {}, or 'auto'",
            psync::server::MAX_WORKERS
        )),
    }
}

fn config(args: &Args) -> Result<ServerConfig, String> {
    let mut bind: Vec<SocketAddr> = if args.bind.is_empty() {
        let mut v = Vec::new();
        if !args.ipv6_only {
            v.push(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), args.port));
        }
        if !args.ipv4_only {
            v.push(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), args.port));
        }
        v
    } else {
        args.bind
            .iter()
            .map(|ip| SocketAddr::new(*ip, args.port))
            .collect()
    };
    if args.ipv4_only && bind.iter().any(|a| a.is_ipv6()) {
        return Err("--bind gives an IPv6 address but -4 asks for IPv4 only".into());
    }
    if args.ipv6_only && bind.iter().any(|a| a.is_ipv4()) {
        return Err("--bind gives an IPv4 address but -6 asks for IPv6 only".into());
    }
    bind.dedup();
    if args.stun_port.is_some_and(|p| p == args.port) {
        return Err("--stun-port must differ from --port (which answers STUN anyway)".into());
    }
    let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    // The ranges above keep these conversions exact on 64-bit systems; on a
    // 32-bit one a huge table is refused here instead of wrapping.
    let count = |n: u64, flag: &str| {
        usize::try_from(n).map_err(|_| format!("--{flag} {n} does not fit this system"))
    };
    let auth = match &args.auth_key_file {
        Some(path) => psync::server::gate::AuthConfig::from_key_file(path, args.require_auth)
            .map_err(|e| format!("--auth-key-file: {e}"))?,
        None => psync::server::gate::AuthConfig::default(),
    };
    Ok(ServerConfig {
        engine: EngineConfig {
            capacity: count(args.capacity, "capacity")?,
            ttl_ms: millis(args.ttl),
            replay_ttl_ms: millis(args.replay_ttl),
            port_lo: args.port_range.0,
            port_hi: args.port_range.1,
            seed: args.seed,
            ipv4: true,
            ipv6: true,
            limits: psync::engine::SourceLimits {
                per_ip: args.max_pending_per_ip,
                v4_24: args.max_pending_per_v4_24,
                v6_56: args.max_pending_per_v6_56,
                v6_48: args.max_pending_per_v6_48,
            },
        },
        bind,
        batch: usize::from(args.batch),
        rcvbuf: args.rcvbuf,
        sndbuf: args.sndbuf,
        stats_interval: (!args.stats_interval.is_zero()).then_some(args.stats_interval),
        rate_limit: RateLimit {
            per_second: args.rate_limit,
            burst: args.burst,
            sources: count(args.rate_limit_sources, "rate-limit-sources")?,
        },
        metrics: args.metrics,
        stun_port: args.stun_port,
        workers: args.workers,
        cluster: cluster_settings(args)?,
        auth,
    })
}

/// Binds as configured. Without -4, -6 or --bind, a host without IPv6 still
/// gets an IPv4 server, with a warning.
fn bind(args: &Args, mut cfg: ServerConfig) -> Result<Server, ServerError> {
    match Server::bind(&cfg) {
        Err(ServerError::Socket { addr, source })
            if addr.is_ipv6() && !args.ipv6_only && args.bind.is_empty() =>
        {
            log::warn!("IPv6 unavailable ({source}); serving IPv4 only");
            cfg.bind.retain(|a| a.is_ipv4());
            Server::bind(&cfg)
        }
        other => other,
    }
}

/// Signals that stop the server with its final counters. Besides the usual
/// three: the CPU and file-size limits (a hard kill follows) and power failure.
#[cfg(target_os = "linux")]
const STOP: &[i32] = &[SIGINT, SIGTERM, SIGQUIT, SIGXCPU, SIGXFSZ, libc::SIGPWR];
#[cfg(not(target_os = "linux"))]
const STOP: &[i32] = &[SIGINT, SIGTERM, SIGQUIT, SIGXCPU, SIGXFSZ];
/// Signals whose default action would end the process, but which mean
/// nothing to this server: logged and otherwise ignored, so that no signal
/// but SIGKILL (and the faults a bug raises) ends it without final counters.
#[cfg(target_os = "linux")]
const IGNORED: &[i32] = &[SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, libc::SIGSTKFLT];
#[cfg(not(target_os = "linux"))]
const IGNORED: &[i32] = &[SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO];

fn main() -> ExitCode {
    let args: Args = match cli::parse(&PROGRAM) {
        Ok(args) => args,
        Err(code) => return code,
    };
    cli::init_logging(match args.verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    });

    let cfg = match config(&args) {
        Ok(cfg) => cfg,
        Err(msg) => {
            cli::error(PROGRAM.name, &msg);
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    if args.replay_capacity.is_some() {
        log::warn!("--replay-capacity is ignored: matches now share --capacity");
    }
    // What the tables will cost, said before they are allocated.
    let mut e = cfg.engine.clone();
    e.ipv6 = cfg.bind.iter().any(|a| a.is_ipv6());
    let need = e.memory().unwrap_or(usize::MAX);
    log::info!(
        "tables need {} MiB ({:.1} bytes per unit of --capacity), plus up to {} MiB for \
         IPv6 matches, resident only as they are held",
        need >> 20,
        need as f64 / e.capacity.max(1) as f64,
        e.ipv6_store_bytes().unwrap_or(usize::MAX) >> 20,
    );
    let mut server = match bind(&args, cfg) {
        Ok(s) => s,
        Err(e) => {
            cli::error(PROGRAM.name, &e.to_string());
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    // Signals first: once "listening" is out, a SIGTERM must find its handler.
    let handle = server.shutdown_handle();
    let all: Vec<i32> = [STOP, IGNORED, &[SIGHUP, SIGUSR1]].concat();
    let mut signals = match signal_hook::iterator::Signals::new(&all) {
        Ok(s) => s,
        Err(e) => {
            cli::error(
                PROGRAM.name,
                &format!("cannot install signal handlers: {e}"),
            );
            return ExitCode::from(1);
        }
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let name = signal_name(sig);
            if sig == SIGHUP {
                log::info!("{name}: reloading");
                handle.reload();
            } else if sig == SIGUSR1 {
                handle.report();
            } else if STOP.contains(&sig) {
                log::info!("{name}: shutting down");
                handle.shutdown();
            } else {
                log::warn!("{name} ignored (SIGINT or SIGTERM stop the server)");
            }
        }
    });

    for addr in server.local_addrs() {
        cli::eprint(&format!("psync-server: listening on udp {addr}"));
    }
    for addr in server.stun_addrs() {
        cli::eprint(&format!("psync-server: STUN on udp {addr}"));
    }
    if let Some(addr) = server.cluster_addr() {
        cli::eprint(&format!("psync-server: cluster on udp {addr}"));
    }
    if let Some(path) = &args.auth_key_file {
        log::info!(
            "protocol v2: tokens checked against {}{}",
            path.display(),
            if args.require_auth {
                "; seed-format requests refused (--require-auth)"
            } else {
                "; seed-format requests served beside it"
            }
        );
    }
    if let Some(addr) = server.metrics_addr() {
        cli::eprint(&format!(
            "psync-server: metrics on http://{addr}/metrics (health: /healthz, /readyz)"
        ));
    }
    log::info!(
        "psync-server {}; {} worker{}, capacity {} pairs, ttl {}, replay ttl {}, ports {}-{}, batch {}, tables {} MiB",
        cli::version(PROGRAM.version),
        server.workers(),
        if server.workers() == 1 { "" } else { "s" },
        args.capacity,
        cli::format_duration(args.ttl),
        cli::format_duration(args.replay_ttl),
        args.port_range.0,
        args.port_range.1,
        args.batch,
        server.table_bytes() >> 20
    );

    match server.run() {
        Ok(counters) => {
            cli::eprint(&format!("psync-server: final counters: {counters}"));
            let split = server.worker_counters();
            if split.len() > 1 {
                let list = |f: fn(&psync::Counters) -> u64| {
                    let v: Vec<String> = split.iter().map(|c| f(c).to_string()).collect();
                    v.join("/")
                };
                cli::eprint(&format!(
                    "psync-server: per worker: received {}, matched {}",
                    list(|c| c.received),
                    list(|c| c.engine.matched)
                ));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            cli::error(PROGRAM.name, &format!("stopped: {e}"));
            ExitCode::from(1)
        }
    }
}

fn signal_name(sig: i32) -> String {
    signal_hook::low_level::signal_name(sig)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("signal {sig}"))
}
