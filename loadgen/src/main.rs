//! `psync-loadgen`: floods a psync server with synthetic peer pairs and
//! reports honest latency histograms.
//!
//! Each pair is two requests, `(x, y)` and `(y, x)` with IDs fresh to the
//! pair, sent from two of `--sockets` UDP sockets that play the peers. Every
//! reply is checked (length, family, partner address, mirrored ports, port
//! range); any wrong reply makes the exit status 1, so the tool doubles as an
//! end-to-end check. Latency runs from the pair's *scheduled* send time to its
//! second reply, so an open-loop run (`--rate N`) shows stalls instead of
//! hiding them; `--rate max --window W` runs closed loop to find saturation.
//!
//! Modules: [`sched`] (when pairs are due), [`pairs`] (socket pairs and reply
//! judgement), [`driver`] (sockets and the loop) and [`report`] (output). All
//! system calls (batched UDP, a timerfd, getrusage) are `psync::sys`'s: this
//! crate has no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!("psync-loadgen uses recvmmsg, sendmmsg and timerfd: it runs on Linux only");

mod driver;
mod format;
mod pairs;
mod report;
mod sched;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use psync::cli::{self, Bare, Program};

use crate::sched::Load;

const PROGRAM: Program = Program {
    name: "psync-loadgen",
    env_prefix: "PSYNC_LOADGEN",
    version: env!("CARGO_PKG_VERSION"),
};

/// Most threads (`--threads`): more than any load generator machine's cores
/// needs.
const MAX_THREADS: usize = 64;
/// Most sockets: the pair table holds n(n-1)/2 socket pairs (half a million at 1024).
const MAX_SOCKETS: usize = 1024;

/// Load generator for psync-server: synthetic peer pairs, checked replies,
/// latency percentiles from the scheduled send time (no coordinated omission).
///
/// Durations take a unit (10s, 500ms, 2m); a bare number is seconds, except
/// for --timeout, where it is milliseconds as it always was. Every flag can
/// also be set with the environment variable shown beside it.
#[derive(Parser, Debug)]
#[command(name = "psync-loadgen")]
struct Args {
    /// The server, as HOST:PORT or [IPv6]:PORT (a name prefers its IPv4
    /// address). For a cluster, several, comma-separated: the two halves of
    /// each pair then go to different members, so forwarding is measured.
    #[arg(short, long, value_name = "ADDR")]
    server: String,

    /// Pairs per second, open loop; or `max` for a closed loop of --window pairs.
    #[arg(short, long, default_value = "10000", value_name = "N|max", value_parser = parse_rate)]
    rate: Rate,

    /// Closed loop (--rate max): pairs outstanding at once [default: 256, at most
    /// the n(n-1)/2 socket pairs of --sockets n].
    #[arg(short, long, value_name = "W")]
    window: Option<usize>,

    /// Length of the measured window [10ms to 1d].
    #[arg(short, long, default_value = "10s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_millis(10), Duration::from_secs(86_400), false))]
    duration: Duration,

    /// Load before the measurement, not counted [0 to 1d].
    #[arg(long, default_value = "2s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::ZERO, Duration::from_secs(86_400), false))]
    warmup: Duration,

    /// Sender/receiver threads, each with its own --sockets sockets and its
    /// share of --rate, --window and --pending; one merged report [1 to 64].
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_THREADS as i64))]
    threads: u16,

    /// UDP sockets playing the peers, per thread; each pair uses two of them [2 to 1024].
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u16).range(2..=MAX_SOCKETS as i64))]
    sockets: u16,

    /// How long a pair may take before it counts as lost; a bare number is
    /// milliseconds [1ms to 10m].
    #[arg(long, default_value = "1s", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Millis, Duration::from_millis(1), Duration::from_secs(600), false))]
    timeout: Duration,

    /// Send N one-sided registrations first (never matched), to load the
    /// table [0 to 100000000].
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pending: u64,

    /// Fraction of requests sent again after their reply (exercises the replay cache).
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = parse_fraction)]
    retransmit: f64,

    /// Malformed datagrams per pair (they must get no reply).
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = parse_fraction)]
    bad_ratio: f64,

    /// Check that every port handed out lies in LO-HI (the server's --port-range).
    #[arg(long, value_name = "LO-HI", value_parser = psync::engine::parse_port_range)]
    port_range: Option<(u16, u16)>,

    /// Local address for the peer sockets (default: the route's source address).
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,

    /// Write the latency percentile distribution (HdrHistogram text, ms) to FILE.
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,

    /// Draw the latency percentile curve to FILE.svg.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// No progress line on stderr.
    #[arg(short, long)]
    quiet: bool,

    /// Speak protocol v2: every request carries a token issued with the last
    /// key of this key file (the server's --auth-key-file). Run the server
    /// with --rate-limit 0, or it asks for cookies.
    #[arg(long, value_name = "PATH")]
    auth_key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug)]
enum Rate {
    Pairs(f64),
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1e9 => Ok(Rate::Pairs(r)),
        _ => Err(format!(
            "'{s}' is not a positive number of pairs per second, or 'max'"
        )),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a fraction between 0 and 1")),
    }
}

fn resolve(server: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = server
        .to_socket_addrs()
        .map_err(|e| format!("--server {server}: {e} (give HOST:PORT)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("--server {server}: the name has no address"))
}

/// `total` split over `n` parts, the first `total % n` one larger.
fn part(total: u64, n: usize, k: usize) -> u64 {
    total / n as u64 + u64::from((k as u64) < total % n as u64)
}

/// One configuration per thread: the rate, window and preload divided,
/// each thread with its own sockets and part of the ID space.
fn thread_configs(args: &Args, cfg: driver::Config) -> Result<Vec<driver::Config>, String> {
    let n = usize::from(args.threads);
    if let Load::Window(w) = cfg.load {
        if w < n {
            return Err(format!(
                "--window {w} is below --threads {n}: every thread needs a pair in flight"
            ));
        }
    }
    let first = driver::Thread::new(0, n);
    Ok((0..n)
        .map(|k| {
            let mut c = cfg.clone();
            c.thread = driver::Thread {
                index: k,
                ..first.clone()
            };
            c.load = match cfg.load {
                Load::Rate(r) => Load::Rate(r / n as f64),
                Load::Window(w) => Load::Window(part(w as u64, n, k) as usize),
            };
            c.pending = part(cfg.pending, n, k);
            c
        })
        .collect())
}

fn config(args: &Args, stop: Arc<AtomicBool>) -> Result<driver::Config, String> {
    let servers: Vec<SocketAddr> = args
        .server
        .split(',')
        .map(|s| resolve(s.trim()))
        .collect::<Result<_, _>>()?;
    let server = servers[0];
    if servers.iter().any(|s| s.is_ipv4() != server.is_ipv4()) {
        return Err("--server: the servers must all be of one address family".into());
    }
    let sockets = usize::from(args.sockets);
    let slots = pairs::socket_pairs(sockets);
    let load = match (args.rate, args.window) {
        (Rate::Pairs(_), Some(_)) => {
            return Err("--window applies to --rate max (closed loop) only".into())
        }
        (Rate::Pairs(r), None) => Load::Rate(r),
        (Rate::Max, w) => {
            let threads = usize::from(args.threads);
            let slots = slots * threads;
            let w = w.unwrap_or(256.min(slots).max(threads));
            if w == 0 || w > slots {
                return Err(format!(
                    "--window {w} needs 1 to {slots} pairs in flight with {} sockets on each of \
                     {threads} threads (n sockets make n(n-1)/2 socket pairs): raise --sockets",
                    args.sockets
                ));
            }
            Load::Window(w)
        }
    };
    let local_ip = match args.bind {
        Some(ip) if ip.is_ipv4() != server.is_ipv4() => {
            return Err(format!("--bind {ip} is not of the server's address family"))
        }
        Some(ip) => ip,
        None => driver::local_ip_for(server).map_err(|e| format!("no route to {server}: {e}"))?,
    };
    let format = match &args.auth_key_file {
        None => format::Format::Seed,
        Some(path) => {
            let keys = psync::server::gate::load_key_file(path)
                .map_err(|e| format!("--auth-key-file: {e}"))?;
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // Valid through the whole run and its drain, with an hour to spare.
            let run = args.warmup + args.duration + args.timeout;
            format::Format::V2 {
                key: Box::new(keys.last().clone()),
                expiry: since.as_secs() + run.as_secs() + 3600,
                // IDs of this run differ from another run's in their high
                // half (a restarted run meets no stale registration).
                high: u64::from(since.subsec_nanos() ^ std::process::id().rotate_left(16)),
            }
        }
    };
    Ok(driver::Config {
        format,
        server,
        servers,
        local_ip,
        sockets,
        duration: args.duration,
        warmup: args.warmup,
        timeout: args.timeout,
        load,
        pending: args.pending,
        retransmit: args.retransmit,
        bad_ratio: args.bad_ratio,
        port_range: args.port_range,
        progress: !args.quiet,
        stop,
        thread: driver::Thread::alone(),
    })
}

fn main() -> ExitCode {
    let args: Args = match cli::parse(&PROGRAM) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first Ctrl-C ends the run early, with a report of what was
        // measured; a second one (flag already set) exits at once.
        let registered = signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()));
        if let Err(e) = registered {
            cli::error(PROGRAM.name, &format!("cannot handle signals: {e}"));
        }
    }
    let cfg = match config(&args, stop) {
        Ok(c) => c,
        Err(e) => {
            cli::error(PROGRAM.name, &e);
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let cfgs = match thread_configs(&args, cfg.clone()) {
        Ok(c) => c,
        Err(e) => {
            cli::error(PROGRAM.name, &e);
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let results = match driver::run_threads(cfgs) {
        Ok(r) => r,
        Err(e) => {
            cli::error(PROGRAM.name, &e.to_string());
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    // A dead server (or the wrong address or family) is the one thing to
    // say first; everything else in the report follows from it.
    let none_completed =
        results.all.issued > 0 && results.all.completed == 0 && !results.any_wrong();
    if none_completed {
        cli::error(
            PROGRAM.name,
            &format!(
                "no pair completed: no reply from {} (is psync-server running there, on that \
                 address family, with --rate-limit 0 --max-pending-per-ip 0?)",
                cfg.server
            ),
        );
    }
    let out = if args.json {
        report::json(&results, cfg.server) + "\n"
    } else {
        report::text(&results, cfg.server)
    };
    cli::print(&out);
    let mut failed = false;
    if let Some(path) = &args.hgrm {
        if let Err(e) = report::save_hgrm(&results.histogram, path) {
            cli::error(
                PROGRAM.name,
                &format!("cannot write {}: {e}", path.display()),
            );
            failed = true;
        }
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "psync pair-completion latency, {:.0} pairs/s, {} pairs",
            results.pairs_per_sec(),
            results.histogram.len()
        );
        if let Err(e) = report::save_plot(&results.histogram, path, &title) {
            cli::error(PROGRAM.name, &format!("cannot draw the plot: {e}"));
            failed = true;
        }
    }
    if results.any_wrong() {
        cli::error(
            PROGRAM.name,
            &format!("FAILED: {} wrong replies", results.wrong.total()),
        );
        return ExitCode::from(1);
    }
    if none_completed {
        return ExitCode::from(1);
    }
    if failed {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
