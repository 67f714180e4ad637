//! What the command-line programs share, so that `psync-server`,
//! `psync-client` and `psync-loadgen` look and behave alike
//! (docs/cli.md is the user's side of this):
//!
//! - [`parse`]: clap parsing with one error shape (`NAME: error: ...` on one
//!   line, exit status 2), an environment variable for every flag
//!   (`PSYNC_<PROGRAM>_<FLAG>`, shown in `--help`), help wrapped to the
//!   terminal, `--version` with the git commit and features, and the hidden
//!   `--generate-man` / `--generate-completions SHELL` that print a man page
//!   or a shell completion script built from the same definitions;
//! - [`duration`] and [`size`]: value parsers for `30s`, `500ms`, `2m`,
//!   `4M`, each with a range, so every flag rejects what it cannot use with
//!   one line that names it;
//! - [`init_logging`]: `-v` levels with `RUST_LOG` on top;
//! - [`error`], [`eprint`], [`print`]: output that never panics when stdout
//!   or stderr is closed (unlike `println!` and `eprintln!`).
//!
//! Nothing here runs on the hot path.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, CommandFactory, FromArgMatches};
use log::LevelFilter;

/// The git commit this was built from (`unknown` when the build had no way
/// to tell; see `build.rs`).
pub const COMMIT: &str = env!("PSYNC_BUILD_COMMIT");
/// The enabled cargo features of the `psync` crate, comma-separated, or `none`.
pub const FEATURES: &str = env!("PSYNC_BUILD_FEATURES");

/// Exit status for usage errors: a bad flag or value (as clap's own).
pub const EXIT_USAGE: u8 = 2;

/// Log target that is always shown at info level, whatever `-v` says: lines
/// an operator asked for, such as the counters on SIGUSR1.
pub const REPORT_TARGET: &str = "psync::report";

/// `VERSION (commit C, features: F)`, what `--version` prints after the name.
pub fn version(pkg_version: &str) -> String {
    format!("{pkg_version} (commit {COMMIT}, features: {FEATURES})")
}

/// One program's identity for [`parse`].
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// The binary's name, as it prefixes error lines (`psync-server`).
    pub name: &'static str,
    /// Prefix of the environment variables (`PSYNC_SERVER`): flag `--max-x`
    /// is also read from `PSYNC_SERVER_MAX_X`.
    pub env_prefix: &'static str,
    /// The package version (`env!("CARGO_PKG_VERSION")` of the binary's crate).
    pub version: &'static str,
}

const GENERATE_MAN: &str = "generate-man";
const GENERATE_COMPLETIONS: &str = "generate-completions";

/// The environment variable that stands for `arg` in `program`.
pub fn env_name(program: &Program, arg: &Arg) -> String {
    let flag = arg
        .get_long()
        .map(str::to_owned)
        .unwrap_or_else(|| arg.get_id().as_str().to_owned());
    format!("{}_{}", program.env_prefix, flag)
        .to_uppercase()
        .replace('-', "_")
}

/// The full clap command of `T` as [`parse`] uses it: environment
/// variables, version, width, and the hidden generator flags.
pub fn command<T: CommandFactory>(program: &Program) -> clap::Command {
    T::command()
        .name(program.name)
        .bin_name(program.name)
        .version(version(program.version))
        .max_term_width(100)
        .mut_args(|arg| {
            if matches!(arg.get_id().as_str(), "help" | "version") || arg.is_hide_set() {
                return arg;
            }
            let name = env_name(program, &arg);
            arg.env(name)
        })
        .arg(
            Arg::new(GENERATE_MAN)
                .long(GENERATE_MAN)
                .help("Print this program's man page (roff) on stdout and exit")
                .action(ArgAction::SetTrue)
                .exclusive(true)
                .hide(true),
        )
        .arg(
            Arg::new(GENERATE_COMPLETIONS)
                .long(GENERATE_COMPLETIONS)
                .value_name("SHELL")
                .help("Print a completion script for SHELL on stdout and exit")
                .value_parser(clap::value_parser!(clap_complete::Shell))
                .exclusive(true)
                .hide(true),
        )
}

/// Parses the process's arguments (and `PSYNC_...` variables) into `T`.
/// `Err` carries the exit status when the program must stop now: 0 after
/// `--help`, `--version` or a generator flag, 2 after a usage error, whose
/// one line has been printed.
pub fn parse<T: CommandFactory + FromArgMatches>(program: &Program) -> Result<T, ExitCode> {
    parse_from(program, std::env::args_os())
}

/// [`parse`] over explicit arguments (the first is the program name).
pub fn parse_from<T, I, A>(program: &Program, args: I) -> Result<T, ExitCode>
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = A>,
    A: Into<OsString> + Clone,
{
    let mut cmd = command::<T>(program);
    let matches = match cmd.clone().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => return Err(clap_exit(program, &e)),
    };
    if matches.get_flag(GENERATE_MAN) {
        let mut out = Vec::new();
        let rendered = clap_mangen::Man::new(cmd.clone()).render(&mut out);
        if let Err(e) = rendered.and_then(|_| std::io::stdout().lock().write_all(&out)) {
            error(program.name, &format!("cannot write the man page: {e}"));
            return Err(ExitCode::from(1));
        }
        return Err(ExitCode::SUCCESS);
    }
    if let Some(shell) = matches.get_one::<clap_complete::Shell>(GENERATE_COMPLETIONS) {
        let mut out = Vec::new();
        clap_complete::generate(*shell, &mut cmd, program.name, &mut out);
        if let Err(e) = std::io::stdout().lock().write_all(&out) {
            error(program.name, &format!("cannot write the completions: {e}"));
            return Err(ExitCode::from(1));
        }
        return Err(ExitCode::SUCCESS);
    }
    T::from_arg_matches(&matches).map_err(|e| clap_exit(program, &e))
}

/// Prints what clap has to say: help and version as clap renders them, on
/// stdout with status 0; anything else as one error line with status 2.
fn clap_exit(program: &Program, e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            print(&e.render().to_string());
            ExitCode::SUCCESS
        }
        _ => {
            error(program.name, &one_line(&e.render().to_string()));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Folds clap's multi-line error text into one line: the message, the items
/// it lists, and its tip; the usage block and the "try --help" line are
/// dropped (`--help` is always there).
pub fn one_line(rendered: &str) -> String {
    let mut message = String::new();
    let mut items: Vec<&str> = Vec::new();
    let mut tips: Vec<&str> = Vec::new();
    for line in rendered.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("Usage:") || trimmed.starts_with("For more information") {
            break;
        }
        if trimmed.is_empty() {
            continue;
        }
        if message.is_empty() {
            message = trimmed
                .strip_prefix("error: ")
                .unwrap_or(trimmed)
                .to_owned();
        } else if let Some(tip) = trimmed.strip_prefix("tip: ") {
            tips.push(tip);
        } else {
            items.push(trimmed);
        }
    }
    if !items.is_empty() {
        if !message.ends_with(':') {
            message.push(':');
        }
        message.push(' ');
        message.push_str(&items.join(", "));
    }
    for tip in tips {
        message.push_str(" (");
        message.push_str(tip);
        message.push(')');
    }
    message
}

/// Writes `NAME: error: MESSAGE` on stderr, ignoring a closed stderr.
pub fn error(name: &str, message: &str) {
    eprint(&format!("{name}: error: {message}"));
}

/// Writes `line` and a newline on stderr; a closed or broken stderr is
/// ignored rather than a panic (as `eprintln!` would).
pub fn eprint(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    if !line.ends_with('\n') {
        let _ = err.write_all(b"\n");
    }
    let _ = err.flush();
}

/// Writes `line` and a newline on stdout, ignoring a closed stdout. Returns
/// false when the write failed.
pub fn print(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    let mut ok = out.write_all(line.as_bytes()).is_ok();
    if !line.ends_with('\n') {
        ok &= out.write_all(b"\n").is_ok();
    }
    ok & out.flush().is_ok()
}

/// Sets up `log` on stderr: `level` from `-v`, then `RUST_LOG` on top when
/// set (its directives win where they speak, e.g. `RUST_LOG=psync::server=debug`
/// or `RUST_LOG=warn`). [`REPORT_TARGET`] is always on at info level.
pub fn init_logging(level: LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        .filter_module(REPORT_TARGET, LevelFilter::Info)
        .format_target(false);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    // A second init (tests calling in twice) keeps the first logger.
    let _ = builder.try_init();
}

/// How a bare number (no unit) is read by a [`duration`] parser: what the
/// flag meant before units existed, so old command lines keep working.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bare {
    /// `30` means 30 s.
    Seconds,
    /// `500` means 500 ms.
    Millis,
}

const UNITS: [(&str, f64); 6] = [
    ("ms", 1e-3),
    ("s", 1.0),
    ("m", 60.0),
    ("min", 60.0),
    ("h", 3600.0),
    ("d", 86_400.0),
];

/// Reads `30s`, `500ms`, `1.5s`, `2m`, `1h`, `1d`, or a bare number in the
/// `bare` unit.
pub fn parse_duration(s: &str, bare: Bare) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "" => match bare {
            Bare::Seconds => 1.0,
            Bare::Millis => 1e-3,
        },
        u => UNITS
            .iter()
            .find(|(name, _)| *name == u)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| format!("'{s}' is not a duration (write it like 30s, 500ms, 2m, 1h)"))?,
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (write it like 30s, 500ms, 2m, 1h)"))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("'{s}' is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Writes a duration the way [`parse_duration`] reads it: `100ms`, `30s`,
/// `1.5s`, `2m`, `1d`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 && !d.is_zero() {
        return format!("{}us", d.as_micros());
    }
    match ms {
        0 => "0s".into(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms if ms < 1000 => format!("{ms}ms"),
        ms => format!("{}s", ms as f64 / 1000.0),
    }
}

/// A clap value parser for a duration flag: bare numbers in `bare` units,
/// at least `min` and at most `max`; with `zero_off`, `0` is also accepted
/// (it means "off").
pub fn duration(
    bare: Bare,
    min: Duration,
    max: Duration,
    zero_off: bool,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let d = parse_duration(s, bare)?;
        if (zero_off && d.is_zero()) || (min..=max).contains(&d) {
            return Ok(d);
        }
        let range = format!("{} to {}", format_duration(min), format_duration(max));
        Err(if zero_off {
            format!("must be 0 (off) or {range}")
        } else {
            format!("must be {range}")
        })
    }
}

/// Reads a byte count: `4194304`, `512K`, `4M`, `1G` (binary multiples;
/// `KiB`, `MiB`, `GiB` and lower case also accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => {
            return Err(format!(
                "'{s}' is not a size (write it like 4194304, 512K or 4M)"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("'{s}' is not a size (write it like 4194304, 512K or 4M)"))
}

/// Writes a byte count the way [`parse_size`] reads it.
pub fn format_size(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// A clap value parser for a byte-count flag in `min..=max`; with
/// `zero_ok`, `0` is also accepted (it means "the default of the system").
pub fn size(
    min: u64,
    max: u64,
    zero_ok: bool,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let n = parse_size(s)?;
        if (zero_ok && n == 0) || (min..=max).contains(&n) {
            return usize::try_from(n).map_err(|_| format!("'{s}' is too large"));
        }
        let range = format!("{} to {}", format_size(min), format_size(max));
        Err(if zero_ok {
            format!("must be 0 (system default) or {range}")
        } else {
            format!("must be {range}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units_and_bare_numbers() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("30", Bare::Seconds), Ok(ms(30_000)));
        assert_eq!(parse_duration("0.6", Bare::Seconds), Ok(ms(600)));
        assert_eq!(parse_duration("1000", Bare::Millis), Ok(ms(1000)));
        assert_eq!(parse_duration("30s", Bare::Millis), Ok(ms(30_000)));
        assert_eq!(parse_duration("500ms", Bare::Seconds), Ok(ms(500)));
        assert_eq!(parse_duration("1.5s", Bare::Seconds), Ok(ms(1500)));
        assert_eq!(parse_duration("2m", Bare::Seconds), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h", Bare::Seconds), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1d", Bare::Seconds), Ok(ms(86_400_000)));
        for bad in ["", "-1", "1e-9", "s", "1x", "1 2s", "nan", "inf", "1..2s"] {
            assert!(parse_duration(bad, Bare::Seconds).is_err(), "{bad}");
        }
        assert!(parse_duration("99999999999999d", Bare::Seconds).is_err());
    }

    #[test]
    fn duration_ranges_name_their_bounds() {
        let p = duration(
            Bare::Seconds,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
            true,
        );
        assert_eq!(p("0"), Ok(Duration::ZERO));
        assert_eq!(p("10"), Ok(Duration::from_secs(10)));
        assert_eq!(p("0.5").unwrap_err(), "must be 0 (off) or 1s to 1d");
        let p = duration(
            Bare::Millis,
            Duration::from_millis(1),
            Duration::from_secs(600),
            false,
        );
        assert_eq!(p("0").unwrap_err(), "must be 1ms to 10m");
    }

    #[test]
    fn durations_print_as_they_parse() {
        for s in ["100ms", "30s", "1.5s", "2m", "1h", "1d", "0s"] {
            let d = parse_duration(s, Bare::Seconds).unwrap();
            assert_eq!(format_duration(d), s);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "lots", "-1", "4T", "1.5M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let p = size(4096, 1 << 30, true);
        assert_eq!(p("0"), Ok(0));
        assert_eq!(
            p("1").unwrap_err(),
            "must be 0 (system default) or 4K to 1G"
        );
        assert_eq!(format_size(4 << 20), "4M");
    }

    #[test]
    fn clap_errors_fold_to_one_line() {
        let text = "error: the following required arguments were not provided:\n  --server <HOST:PORT>\n  --self <ID>\n\nUsage: psync-client --server <HOST:PORT> --self <ID>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(text),
            "the following required arguments were not provided: --server <HOST:PORT>, --self <ID>"
        );
        let text = "error: unexpected argument '--prot' found\n\n  tip: a similar argument exists: '--port'\n\nUsage: x\n";
        assert_eq!(
            one_line(text),
            "unexpected argument '--prot' found (a similar argument exists: '--port')"
        );
    }
}
