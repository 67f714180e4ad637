//! `psync-server`: the command line front end. Arguments become a
//! [`ServerConfig`]; the library does the rest.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use log::LevelFilter;
use psync::limit::RateLimit;
use psync::{EngineConfig, Server, ServerConfig, ServerError};
use signal_hook::consts::{SIGINT, SIGTERM};

/// psync rendezvous server: lets two peers behind NAT learn each other's
/// public address. Each peer sends {self_id, peer_id} (8 bytes); when both
/// halves of a pair have arrived, each gets the other's address and two ports.
#[derive(Parser, Debug)]
#[command(name = "psync-server", version)]
struct Args {
    /// Serve IPv4 only.
    #[arg(short = '4', conflicts_with = "ipv6_only")]
    ipv4_only: bool,

    /// Serve IPv6 only.
    #[arg(short = '6')]
    ipv6_only: bool,

    /// UDP port to listen on (0 picks a free one and prints it).
    #[arg(short, long, default_value_t = 1024)]
    port: u16,

    /// Address to bind instead of the wildcard; at most one per family.
    #[arg(long, value_name = "ADDR")]
    bind: Vec<IpAddr>,

    /// More output: -v startup and periodic stats, -vv one line per match,
    /// -vvv one line per packet.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,

    /// Seconds a registration waits for its partner.
    #[arg(long, default_value = "30", value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    ttl: Duration,

    /// Seconds a match's replies are resent to retransmitted requests.
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    replay_ttl: Duration,

    /// Most pending registrations held at once (tables are allocated at start).
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    capacity: usize,

    /// Most matches remembered for replay, per address family.
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    replay_capacity: usize,

    /// Ports handed to peers, inclusive.
    #[arg(long, default_value = "1024-65535", value_name = "LO-HI", value_parser = psync::engine::parse_port_range)]
    port_range: (u16, u16),

    /// Datagrams per recvmmsg/sendmmsg call.
    #[arg(long, default_value_t = 64, value_name = "N")]
    batch: usize,

    /// Socket receive buffer in bytes (K and M suffixes allowed; 0: kernel default).
    #[arg(long, default_value = "4M", value_name = "BYTES", value_parser = parse_bytes)]
    rcvbuf: usize,

    /// Socket send buffer in bytes (K and M suffixes allowed; 0: kernel default).
    #[arg(long, default_value = "4M", value_name = "BYTES", value_parser = parse_bytes)]
    sndbuf: usize,

    /// Seconds between stats lines at -v (0: never).
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    stats_interval: Duration,

    /// Datagrams per second allowed from one source (IPv4 address or IPv6 /64); 0: no limit.
    #[arg(long, default_value_t = 100, value_name = "PPS")]
    rate_limit: u32,

    /// Datagrams a source may send at once before --rate-limit applies.
    #[arg(long, default_value_t = 200, value_name = "N")]
    burst: u32,

    /// Sources the rate limiter tracks at once (memory: 24 bytes each).
    #[arg(long, default_value_t = 1 << 16, value_name = "N")]
    rate_limit_sources: usize,

    /// Most pending registrations one source may hold (at most 65535); 0: no limit.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    max_pending_per_ip: u32,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Also answer STUN Binding requests (RFC 8489) on this UDP port. The main
    /// port answers them anyway; a second port lets psync-client tell whether
    /// its NAT keeps one public port for every destination (1-65535, not --port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    stun_port: Option<u16>,

    /// Seed for port choice and hashing, for reproducible runs (default: from the OS).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s} is outside 0 to 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or_else(|| format!("'{s}' is not a size in bytes (like 4194304 or 4M)"))
}

fn millis(d: Duration, flag: &str) -> Result<u32, String> {
    let ms = d.as_millis();
    if ms == 0 {
        return Err(format!("--{flag} must be at least 1 ms"));
    }
    Ok(ms as u32)
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
    if args.capacity == 0 {
        return Err("--capacity must be at least 1".into());
    }
    if args.rate_limit > 0 && (args.burst == 0 || args.rate_limit_sources == 0) {
        return Err(
            "--burst and --rate-limit-sources must be at least 1 when --rate-limit is on".into(),
        );
    }
    if args.max_pending_per_ip > u32::from(u16::MAX) {
        return Err("--max-pending-per-ip must be at most 65535 (0 turns the limit off)".into());
    }
    if args.replay_capacity == 0 {
        return Err("--replay-capacity must be at least 1".into());
    }
    if args.stun_port.is_some_and(|p| p == args.port) {
        return Err("--stun-port must differ from --port (which answers STUN anyway)".into());
    }
    Ok(ServerConfig {
        engine: EngineConfig {
            capacity: args.capacity,
            replay_capacity: args.replay_capacity,
            ttl_ms: millis(args.ttl, "ttl")?,
            replay_ttl_ms: millis(args.replay_ttl, "replay-ttl")?,
            port_lo: args.port_range.0,
            port_hi: args.port_range.1,
            seed: args.seed,
            ipv4: true,
            ipv6: true,
            max_pending_per_source: args.max_pending_per_ip,
        },
        bind,
        batch: args.batch,
        rcvbuf: args.rcvbuf,
        sndbuf: args.sndbuf,
        stats_interval: (!args.stats_interval.is_zero()).then_some(args.stats_interval),
        rate_limit: RateLimit {
            per_second: args.rate_limit,
            burst: args.burst,
            sources: args.rate_limit_sources,
        },
        metrics: args.metrics,
        stun_port: args.stun_port,
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

fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .init();

    let cfg = match config(&args) {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("psync-server: error: {msg}");
            return ExitCode::from(2);
        }
    };
    let mut server = match bind(&args, cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("psync-server: error: {e}");
            return ExitCode::from(2);
        }
    };
    for addr in server.local_addrs() {
        eprintln!("psync-server: listening on udp {addr}");
    }
    for addr in server.stun_addrs() {
        eprintln!("psync-server: STUN on udp {addr}");
    }
    if let Some(addr) = server.metrics_addr() {
        eprintln!("psync-server: metrics on http://{addr}/metrics");
    }
    log::info!(
        "capacity {} pending, ttl {:?}, replay ttl {:?}, ports {}-{}, batch {}, tables {} MiB",
        args.capacity,
        args.ttl,
        args.replay_ttl,
        args.port_range.0,
        args.port_range.1,
        args.batch,
        server.table_bytes() >> 20
    );

    let handle = server.shutdown_handle();
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("psync-server: error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: shutting down");
            handle.shutdown();
        }
    });

    match server.run() {
        Ok(counters) => {
            eprintln!("psync-server: final counters: {counters}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("psync-server: error: event loop failed: {e}");
            ExitCode::from(1)
        }
    }
}
