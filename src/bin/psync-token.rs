//! `psync-token`: issues the tokens protocol v2 checks, from the server's key
//! file, for an application backend or an operator. [`psync::auth`] does the
//! work; this is the command line around it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use psync::auth::{decode_token, encode_token, KeySet, TokenError, CLOCK_SKEW_SECS};
use psync::cli::{self, Bare, Program};
use psync::wire::v2::Pair;

const PROGRAM: Program = Program {
    name: "psync-token",
    env_prefix: "PSYNC_TOKEN",
    version: env!("CARGO_PKG_VERSION"),
};

/// Longest token lifetime accepted: a year. Tokens are meant to live minutes.
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 86_400);

/// psync token issuer: prints a token that lets peer SELF meet peer PEER
/// through a psync server that has the same key file (`--auth-key-file`).
/// Give each peer the token for its own direction (`--both` prints the two);
/// the peer passes it to `psync-client --token`.
///
/// Exit status: 0 done (with --check: the token is valid); 1 with --check,
/// the token is not valid; 2 bad usage or an unusable key file.
#[derive(Parser, Debug)]
#[command(name = "psync-token", version)]
struct Args {
    /// The key file: `KEY_ID SECRET_HEX` per line (docs/auth.md).
    #[arg(long, value_name = "PATH", required_unless_present = "new_key")]
    key_file: Option<PathBuf>,

    /// The key to issue with (default: the key listed last in the file).
    #[arg(long, value_name = "N")]
    key_id: Option<u32>,

    /// The ID of the peer that will use the token (decimal, or hex with 0x).
    #[arg(
        long = "self",
        value_name = "ID",
        value_parser = parse_id,
        allow_negative_numbers = true,
        required_unless_present_any = ["check", "new_key"]
    )]
    self_id: Option<u64>,

    /// The ID of the peer it may meet (decimal, or hex with 0x).
    #[arg(
        long,
        value_name = "ID",
        value_parser = parse_id,
        allow_negative_numbers = true,
        required_unless_present_any = ["check", "new_key"]
    )]
    peer: Option<u64>,

    /// How long the token is valid from now: 90 (seconds), 30s, 10m, 2h, 1d [1s to 366d].
    #[arg(long, default_value = "10m", value_name = "DURATION", allow_negative_numbers = true,
          value_parser = cli::duration(Bare::Seconds, Duration::from_secs(1), MAX_LIFETIME, false))]
    lifetime: Duration,

    /// Expire at this Unix time (seconds) instead of after --lifetime.
    #[arg(long, value_name = "UNIX_SECS", conflicts_with = "lifetime")]
    expiry: Option<u64>,

    /// Also print the token for the other direction (PEER to SELF), on a second line.
    #[arg(long)]
    both: bool,

    /// Instead of issuing: show what TOKEN holds and whether the key file accepts it now.
    #[arg(long, value_name = "TOKEN", conflicts_with_all = ["self_id", "peer", "both", "key_id"])]
    check: Option<String>,

    /// Instead of issuing: print a key-file line for key ID with a new random
    /// 32-byte secret (append it to the key file).
    #[arg(long, value_name = "ID", conflicts_with_all = ["self_id", "peer", "both", "check", "key_id"])]
    new_key: Option<u32>,
}

fn parse_id(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse::<u64>(),
    };
    parsed.map_err(|_| format!("'{s}' is not a 64-bit ID (decimal, or hex with 0x)"))
}

fn now_unix() -> u64 {
    // A clock before 1970 is a broken host; treat it as 1970.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_keys(path: &Path) -> Result<KeySet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    warn_if_shared(path);
    KeySet::parse(&text).map_err(|e| format!("key file {}: {e}", path.display()))
}

/// A key file others can read gives away every pair's tokens.
#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            cli::eprint(&format!(
                "psync-token: warning: key file {} can be read by other users (chmod 600 it)",
                path.display()
            ));
        }
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_: &Path) {}

fn issue(args: &Args, keys: &KeySet) -> Result<Vec<String>, String> {
    let key = match args.key_id {
        Some(id) => keys.get(id).ok_or_else(|| {
            let ids: Vec<String> = keys.ids().map(|i| i.to_string()).collect();
            format!("--key-id {id}: the key file has keys {}", ids.join(", "))
        })?,
        None => keys.last(),
    };
    let (Some(self_id), Some(peer)) = (args.self_id, args.peer) else {
        return Err("--self and --peer are required".into());
    };
    if self_id == peer {
        return Err(format!(
            "--self and --peer are both {self_id}; a pair needs two IDs"
        ));
    }
    let expiry = match args.expiry {
        Some(e) => e,
        None => now_unix().saturating_add(args.lifetime.as_secs()),
    };
    let pair = Pair::new(self_id, peer);
    let mut out = vec![encode_token(&key.issue(pair, expiry))];
    if args.both {
        out.push(encode_token(&key.issue(pair.counterpart(), expiry)));
    }
    Ok(out)
}

/// Prints what a token holds and whether it is valid now; returns its validity.
fn check(text: &str, keys: &KeySet) -> Result<bool, String> {
    let token = decode_token(text).map_err(|e| format!("--check: {e}"))?;
    let now = now_unix();
    let left = i128::from(token.expiry) - i128::from(now);
    let when = if left >= 0 {
        format!("in {left} s")
    } else {
        format!("{} s ago", -left)
    };
    cli::print(&format!(
        "self:    {}\npeer:    {}\nkey id:  {}\nexpiry:  {} ({when})",
        token.pair.self_id, token.pair.peer_id, token.key_id, token.expiry
    ));
    match keys.verify(&token, now) {
        Ok(_) => {
            cli::print("valid:   yes");
            Ok(true)
        }
        Err(e) => {
            let why = match e {
                TokenError::Expired => {
                    format!("{e} (even allowing {CLOCK_SKEW_SECS} s of clock skew)")
                }
                _ => e.to_string(),
            };
            cli::print(&format!("valid:   no: {why}"));
            Ok(false)
        }
    }
}

fn new_key_line(id: u32) -> Result<String, String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("cannot get random bytes: {e}"))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{id} {hex}"))
}

fn run(args: &Args) -> Result<ExitCode, String> {
    if let Some(id) = args.new_key {
        print_or_fail(&new_key_line(id)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let path = args
        .key_file
        .as_deref()
        .ok_or("--key-file (or PSYNC_TOKEN_KEY_FILE) is required")?;
    let keys = read_keys(path)?;
    if let Some(text) = &args.check {
        let valid = check(text, &keys)?;
        return Ok(if valid {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    for line in issue(args, &keys)? {
        print_or_fail(&line)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a line of output; a token nobody received is a failure.
fn print_or_fail(line: &str) -> Result<(), String> {
    if cli::print(line) {
        Ok(())
    } else {
        Err("cannot write to stdout".into())
    }
}

fn main() -> ExitCode {
    let args: Args = match cli::parse(&PROGRAM) {
        Ok(args) => args,
        Err(code) => return code,
    };
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            cli::error(PROGRAM.name, &msg);
            ExitCode::from(cli::EXIT_USAGE)
        }
    }
}
