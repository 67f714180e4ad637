//! `psync-client`: the command line peer. Arguments (and `PSYNC_CLIENT_*`
//! variables) become a [`ClientConfig`]; [`psync::client`] does the rest.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use log::LevelFilter;
use psync::cli::{self, Bare, Program};
use psync::client::report::escape;
use psync::client::{
    connect_with_report, ClientConfig, ClientError, ConnectReport, PipeConfig, Strategy,
    DEFAULT_BIRTHDAY_PROBES, DEFAULT_BIRTHDAY_RATE, DEFAULT_BIRTHDAY_SOCKETS, DEFAULT_OPENER_TTL,
};
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
    /// The rendezvous server. For a cluster, several (comma-separated), or a
    /// name with several addresses: the client asks the member that owns
    /// its pair first and falls back to the others (docs/cluster.md).
    #[arg(long, value_name = "HOST:PORT")]
    server: String,

    /// This peer's ID (decimal or 0x hex; sent little-endian). Not with
    /// --token, which names both IDs.
    #[arg(long = "self", value_name = "ID", value_parser = parse_id,
          required_unless_present_any = ["token", "token_file"],
          conflicts_with_all = ["token", "token_file"])]
    self_id: Option<u32>,

    /// The partner's ID (decimal or 0x hex). Not with --token.
    #[arg(long, value_name = "ID", value_parser = parse_id,
          required_unless_present_any = ["token", "token_file"],
          conflicts_with_all = ["token", "token_file"])]
    peer: Option<u32>,

    /// Speak protocol v2 with this token from the application's backend
    /// (59 characters of base64url, `psync-token` prints one): it names
    /// both 64-bit IDs, and the server matches only two valid halves. Prefer
    /// --token-file: a command line is visible to other local users.
    #[arg(long, value_name = "TOKEN", value_parser = parse_token, conflicts_with = "token_file")]
    token: Option<psync::wire::v2::Token>,

    /// Like --token, read from this file (surrounding whitespace ignored).
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,

    /// Try only this strategy (default: all at once, the first proven wins).
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,

    /// Do not try the seed strategy (bind the server-chosen src_port).
    #[arg(long)]
    no_seed: bool,

    /// Do not try the observed strategy (the registration socket).
    #[arg(long)]
    no_observed: bool,

    /// Do not do birthday probing (when one NAT changes ports per destination).
    #[arg(long)]
    no_birthday: bool,

    /// Do not try the peer's local addresses (peers behind one NAT; protocol v2).
    #[arg(long)]
    no_local: bool,

    /// The server's STUN port (psync-server --stun-port): asking it and the
    /// server's port tells whether our NAT changes ports per destination [1 to 65535].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    stun_port: Option<u16>,

    /// Do not classify the NAT (no STUN requests before registering).
    #[arg(long)]
    no_classify: bool,

    /// Do not ask the router for a port mapping (PCP, NAT-PMP and UPnP).
    #[arg(long)]
    no_port_mapping: bool,

    /// Do not ask the router with PCP.
    #[arg(long)]
    no_pcp: bool,

    /// Do not ask the router with NAT-PMP.
    #[arg(long)]
    no_natpmp: bool,

    /// Do not ask the router with UPnP IGD.
    #[arg(long)]
    no_upnp: bool,

    /// How long to wait for the router's answer to port mapping [50ms to 10s].
    #[arg(long, default_value = "700ms", value_name = "DURATION",
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(50), Duration::from_secs(10), false))]
    port_mapping_wait: Duration,

    /// Birthday probing: sockets the hard side opens [1 to 1024].
    #[arg(long, default_value_t = DEFAULT_BIRTHDAY_SOCKETS, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    birthday_sockets: u16,

    /// Birthday probing: random ports the easy side probes per attempt [1 to 65535].
    #[arg(long, default_value_t = DEFAULT_BIRTHDAY_PROBES, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65535))]
    birthday_probes: u32,

    /// Birthday probing: probes per second from the easy side [1 to 5000].
    #[arg(long, default_value_t = DEFAULT_BIRTHDAY_RATE, value_name = "PPS", value_parser = clap::value_parser!(u32).range(1..=5000))]
    birthday_rate: u32,

    /// Birthday probing: normal punching before the easy side probes random
    /// ports, when the partner's NAT is unknown [0ms to 10s].
    #[arg(long, default_value = "500ms", value_name = "DURATION",
          value_parser = cli::duration(Bare::Seconds, Duration::ZERO, Duration::from_secs(10), false))]
    birthday_delay: Duration,

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

    /// Print the result as one JSON object on stdout, also on failure.
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
    /// Many sockets on the hard side, random probes from the easy side.
    Birthday,
    /// The peer's local addresses, for peers behind one NAT (protocol v2).
    Local,
}

fn parse_token(s: &str) -> Result<psync::wire::v2::Token, String> {
    psync::auth::decode_token(s.trim()).map_err(|e| format!("not a psync token: {e}"))
}

/// The token of --token or --token-file, if either.
fn token(args: &Args) -> Result<Option<psync::wire::v2::Token>, String> {
    if let Some(t) = args.token {
        return Ok(Some(t));
    }
    let Some(path) = &args.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    parse_token(&text)
        .map(Some)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))
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

/// Every address `--server` names (comma-separated HOST:PORT, each may
/// resolve to several), of the first one's family, without repeats.
fn resolve(server: &str) -> Result<Vec<SocketAddr>, String> {
    let mut all: Vec<SocketAddr> = Vec::new();
    for one in server.split(',').map(str::trim) {
        let found: Vec<SocketAddr> = one
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve --server '{one}' (want HOST:PORT): {e}"))?
            .collect();
        if found.is_empty() {
            return Err(format!("--server '{one}' resolves to no address"));
        }
        for a in found {
            if !all.contains(&a) {
                all.push(a);
            }
        }
    }
    let ipv4 = all[0].is_ipv4();
    all.retain(|a| a.is_ipv4() == ipv4);
    Ok(all)
}

fn fail(e: &ClientError) -> ExitCode {
    cli::error(PROGRAM.name, &e.to_string());
    ExitCode::from(e.exit_code())
}

/// The `--json` line of a failed connect.
fn failure_json(e: &ClientError, report: &ConnectReport) -> String {
    format!(
        "{{\"ok\":false,\"exit\":{},\"error\":\"{}\",\"attempts\":{},{}}}",
        e.exit_code(),
        escape(&e.to_string()),
        report.attempts,
        report.json_fields()
    )
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

    let servers = match resolve(&args.server) {
        Ok(a) => a,
        Err(msg) => {
            cli::error(PROGRAM.name, &msg);
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let mut cfg = match token(&args) {
        Ok(Some(t)) => ClientConfig::with_token(servers[0], t),
        Ok(None) => ClientConfig::new(
            servers[0],
            PeerId::from_u32(args.self_id.unwrap_or_default()),
            PeerId::from_u32(args.peer.unwrap_or_default()),
        ),
        Err(msg) => {
            cli::error(PROGRAM.name, &msg);
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    // A cluster: the member that owns the pair first (the function the
    // members use), the others in the order that would own it next.
    let request: Vec<u8> = match cfg.token {
        Some(token) => psync::wire::v2::Request {
            token,
            cookie: None,
            info: psync::wire::v2::ClientInfo(0),
            candidates: psync::wire::v2::Candidates::EMPTY,
        }
        .to_bytes()
        .to_vec(),
        None => psync::Request {
            self_id: cfg.self_id,
            peer_id: cfg.peer_id,
        }
        .emit()
        .to_vec(),
    };
    let ranked = psync::cluster::owner::rank(&request, &servers);
    cfg.server = ranked[0];
    cfg.fallbacks = ranked[1..].to_vec();
    cfg.strategy = args.strategy.map(|s| match s {
        StrategyArg::Seed => Strategy::Seed,
        StrategyArg::Observed => Strategy::Observed,
        StrategyArg::Birthday => Strategy::Birthday,
        StrategyArg::Local => Strategy::Local,
    });
    for (off, s) in [
        (args.no_seed, Strategy::Seed),
        (args.no_observed, Strategy::Observed),
        (args.no_birthday, Strategy::Birthday),
        (args.no_local, Strategy::Local),
    ] {
        if off {
            cfg.disabled.push(s);
        }
    }
    cfg.stun_port = args.stun_port;
    cfg.classify = !args.no_classify;
    cfg.port_mapping.pcp = !(args.no_port_mapping || args.no_pcp);
    cfg.port_mapping.natpmp = !(args.no_port_mapping || args.no_natpmp);
    cfg.port_mapping.upnp = !(args.no_port_mapping || args.no_upnp);
    cfg.port_mapping.wait = args.port_mapping_wait;
    cfg.birthday.sockets = args.birthday_sockets;
    cfg.birthday.probes = args.birthday_probes;
    cfg.birthday.rate = args.birthday_rate;
    cfg.birthday.delay = args.birthday_delay;
    cfg.timeout = args.timeout;
    cfg.attempts = args.attempts;
    cfg.opener_ttl = args.opener_ttl;
    cfg.punch_window = args.punch_window;

    let conn = match connect_with_report(&cfg) {
        Ok(c) => c,
        Err(f) => {
            if args.json {
                cli::print(&failure_json(&f.error, &f.report));
            }
            return fail(&f.error);
        }
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
