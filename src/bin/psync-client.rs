//! `psync-client`: the command line peer. Arguments become a
//! [`ClientConfig`]; [`psync::client`] does the rest.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use log::LevelFilter;
use psync::client::{connect, ClientConfig, ClientError, PipeConfig, Strategy, DEFAULT_OPENER_TTL};
use psync::PeerId;

/// psync peer: registers with a psync server, punches a hole through both
/// NATs to the partner and proves the path works both ways.
///
/// Exit status: 0 connected; 2 bad usage; 3 no reply from the server; 4 the
/// server answered but no path could be punched; 1 any other error.
#[derive(Parser, Debug)]
#[command(name = "psync-client", version)]
struct Args {
    /// The rendezvous server.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,

    /// This peer's ID (decimal or 0x hex; sent little-endian).
    #[arg(long = "self", value_name = "ID", value_parser = parse_id)]
    self_id: u32,

    /// The partner's ID (decimal or 0x hex).
    #[arg(long, value_name = "ID", value_parser = parse_id)]
    peer: u32,

    /// Try only this strategy (default: both at once, the first proven wins).
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,

    /// Seconds for the whole connect: registration, punching and every retry.
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_secs)]
    timeout: Duration,

    /// Registrations to try; each retry uses a new socket and gets fresh ports.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    attempts: u32,

    /// TTL of the opener packets sent before punching (0: none, and no path is
    /// held until the peer is heard). 2 leaves one NAT router and dies at the
    /// next hop; raise it behind double NAT.
    #[arg(long, default_value_t = DEFAULT_OPENER_TTL, value_name = "N")]
    opener_ttl: u8,

    /// Seconds one attempt punches before registering again.
    #[arg(long, default_value = "3", value_name = "SECS", value_parser = parse_secs)]
    punch_window: Duration,

    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    /// After connecting, relay stdin to the peer and the peer's data to stdout.
    #[arg(long)]
    pipe: bool,

    /// With --pipe: seconds between keepalives.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs)]
    keepalive: Duration,

    /// With --pipe: end the session when the peer has been silent this long.
    #[arg(long, default_value = "20", value_name = "SECS", value_parser = parse_secs)]
    silence: Duration,

    /// More output on stderr: -v each step, -vv socket-level detail.
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StrategyArg {
    /// Bind the server-chosen src_port, send to the peer's IP at dst_port.
    Seed,
    /// Reuse the registration socket, send to the peer's address as the server saw it.
    Observed,
}

fn parse_id(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    parsed.map_err(|_| format!("'{s}' is not a 32-bit ID (decimal, or hex with 0x)"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{s} is outside 0 (excluded) to 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn resolve(server: &str) -> Result<SocketAddr, String> {
    server
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --server '{server}' (want HOST:PORT): {e}"))?
        .next()
        .ok_or_else(|| format!("--server '{server}' resolves to no address"))
}

fn fail(e: &ClientError) -> ExitCode {
    eprintln!("psync-client: error: {e}");
    ExitCode::from(e.exit_code())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        _ => LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .init();

    let server = match resolve(&args.server) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("psync-client: error: {msg}");
            return ExitCode::from(2);
        }
    };
    let mut cfg = ClientConfig::new(
        server,
        PeerId::from_u32(args.self_id),
        PeerId::from_u32(args.peer),
    );
    cfg.strategy = args.strategy.map(|s| match s {
        StrategyArg::Seed => Strategy::Seed,
        StrategyArg::Observed => Strategy::Observed,
    });
    cfg.timeout = args.timeout;
    cfg.attempts = args.attempts;
    cfg.opener_ttl = args.opener_ttl;
    cfg.punch_window = args.punch_window;

    let conn = match connect(&cfg) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "connected via {} to {} in {} ms",
        conn.strategy,
        conn.peer,
        conn.elapsed.as_millis()
    );
    if args.json {
        println!("{}", conn.to_json());
    }
    if !args.pipe {
        return ExitCode::SUCCESS;
    }
    let pipe = PipeConfig {
        keepalive: args.keepalive,
        silence: args.silence,
    };
    match conn.pipe(std::io::stdin(), std::io::stdout(), &pipe) {
        Ok(stats) => {
            log::info!(
                "session over: {} bytes sent, {} received",
                stats.sent,
                stats.received
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}
