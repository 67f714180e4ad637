//! `psync-client`: the command line peer. Arguments (and `PSYNC_CLIENT_*`
//! variables) become a [`ClientConfig`]; [`psync::client`] does the rest.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use log::LevelFilter;
use psync::cli::{self, Bare, Program};
use psync::client::{connect, ClientConfig, ClientError, PipeConfig, Strategy, DEFAULT_OPENER_TTL};
use psync::PeerId;

/// psync peer: registers with a psync server, punches a hole through both
/// NATs to the partner and proves the path works both ways.
///
/// Exit status: 0 connected; 2 bad usage; 3 no reply from the server (or
/// nothing listens at its port); 4 the server answered but no path could be
/// punched; 1 any other error.
///
/// Durations take a unit (10s, 500ms, 2m); a bare number is seconds. Every
/// flag can also be set with the environment variable shown beside it.
#[derive(Parser, Debug)]
#[command(name = "psync-client")]
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

    /// Time for the whole connect: registration, punching and every retry [10ms to 1d].
    #[arg(long, default_value = "10s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(86_400), false))]
    timeout: Duration,

    /// Registrations to try; each retry uses a new socket and gets fresh ports [1 to 100].
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    attempts: u32,

    /// TTL of the opener packets sent before punching (0: none, and no path is
    /// held until the peer is heard). 2 leaves one NAT router and dies at the
    /// next hop; raise it behind double NAT [0 to 255].
    #[arg(long, default_value_t = DEFAULT_OPENER_TTL, value_name = "N")]
    opener_ttl: u8,

    /// How long one attempt punches before registering again [10ms to 1h].
    #[arg(long, default_value = "3s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(3600), false))]
    punch_window: Duration,

    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    /// After connecting, relay stdin to the peer and the peer's data to stdout.
    #[arg(long)]
    pipe: bool,

    /// With --pipe: time between keepalives [10ms to 1h].
    #[arg(long, default_value = "5s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(3600), false))]
    keepalive: Duration,

    /// With --pipe: end the session when the peer has been silent this long [10ms to 1d].
    #[arg(long, default_value = "20s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(86_400), false))]
    silence: Duration,

    /// More output on stderr: -v each step, -vv socket-level detail. RUST_LOG,
    /// when set, refines it.
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

const PROGRAM: Program = Program {
    name: "psync-client",
    env_prefix: "PSYNC_CLIENT",
    version: env!("CARGO_PKG_VERSION"),
};

fn resolve(server: &str) -> Result<SocketAddr, String> {
    server
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --server '{server}' (want HOST:PORT): {e}"))?
        .next()
        .ok_or_else(|| format!("--server '{server}' resolves to no address"))
}

fn fail(e: &ClientError) -> ExitCode {
    cli::error(PROGRAM.name, &e.to_string());
    ExitCode::from(e.exit_code())
}

fn main() -> ExitCode {
    let args: Args = match cli::parse(&PROGRAM) {
        Ok(args) => args,
        Err(code) => return code,
    };
    cli::init_logging(match args.verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        _ => LevelFilter::Debug,
    });

    let server = match resolve(&args.server) {
        Ok(a) => a,
        Err(msg) => {
            cli::error(PROGRAM.name, &msg);
            return ExitCode::from(cli::EXIT_USAGE);
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
    cli::eprint(&format!(
        "connected via {} to {} in {} ms",
        conn.strategy,
        conn.peer,
        conn.elapsed.as_millis()
    ));
    if args.json {
        cli::print(&conn.to_json());
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
