//! The binaries as an operator runs them: the original command line,
//! signals and final counters, one-line errors for bad settings, flags from
//! the environment, durations, --version, man pages and completions,
//! RUST_LOG, a closed stderr, and the client against a refusing port.

mod util;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use util::{recv, request, socket};

const BIN: &str = env!("CARGO_BIN_EXE_psync-server");

/// A running server process, killed on drop.
struct Proc {
    child: Child,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psync-server");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        Proc { child, stderr }
    }

    /// Reads stderr until the "listening on" line and returns that address.
    fn listening(&mut self) -> SocketAddr {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stderr.read_line(&mut line).unwrap();
            assert!(n > 0, "server exited before listening");
            if let Some(addr) = line.trim().strip_prefix("psync-server: listening on udp ") {
                return addr.parse().unwrap();
            }
        }
    }

    /// Sends SIGTERM, waits, and returns (exit success, rest of stderr).
    fn terminate(mut self) -> (bool, String) {
        signal(self.child.id(), libc::SIGTERM);
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut rest).unwrap();
        (status.success(), rest)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our child.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill failed");
}

fn run_pair(server: SocketAddr) {
    let a = socket("127.0.0.1", Duration::from_secs(2));
    let b = socket("127.0.0.1", Duration::from_secs(2));
    a.send_to(&request(1, 2), server).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.send_to(&request(2, 1), server).unwrap();
    assert_eq!(recv(&a).map(|r| r.len()), Some(20));
    assert_eq!(recv(&b).map(|r| r.len()), Some(20));
}

/// The command line from the original README, unchanged.
#[test]
fn the_original_command_line_works() {
    if UdpSocket::bind("0.0.0.0:1024").is_err() {
        eprintln!("skipped: port 1024 is taken on this host");
        return;
    }
    let mut p = Proc::start(&["-4v", "-p", "1024"]);
    assert_eq!(p.listening(), "0.0.0.0:1024".parse().unwrap());
    run_pair("127.0.0.1:1024".parse().unwrap());
    let (ok, rest) = p.terminate();
    assert!(ok, "SIGTERM exits 0");
    assert!(
        rest.contains("final counters: received=2 ") && rest.contains(" matched=1 "),
        "final counters printed: {rest}"
    );
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut p = Proc::start(&["-4", "-p", "0", "--bind", "127.0.0.1"]);
    let addr = p.listening();
    run_pair(addr);
    signal(p.child.id(), libc::SIGINT);
    let status = p.child.wait().unwrap();
    assert!(status.success());
}

/// Runs the binary with `args`, expecting it to refuse to start.
fn refuses(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run psync-server");
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.trim().is_empty());
    err
}

#[test]
fn bad_settings_get_one_clear_line() {
    let base = ["-4", "-p", "0", "--bind", "127.0.0.1"];
    let cases: &[(&[&str], &str)] = &[
        (&["--capacity", "0"], "--capacity"),
        (&["--port-range", "5000-5000"], "--port-range"),
        (&["--port-range", "0-10"], "--port-range"),
        (&["--port-range", "banana"], "--port-range"),
        (&["--batch", "0"], "--batch"),
        (&["--ttl", "-1"], "--ttl"),
        (&["--ttl", "0"], "--ttl"),
        (&["--rcvbuf", "lots"], "--rcvbuf"),
    ];
    for (extra, flag) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let err = refuses(&args);
        assert!(err.contains(flag), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().filter(|l| l.contains("error")).count(),
            1,
            "{args:?}: {err}"
        );
    }
    // -4 and -6 together make no sense.
    refuses(&["-4", "-6", "-p", "0"]);
}

#[test]
fn a_port_in_use_is_named() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let err = refuses(&["-4", "-p", &port, "--bind", "127.0.0.1"]);
    assert!(err.contains("--port") && err.contains("in use"), "{err}");
}

const CLIENT: &str = env!("CARGO_BIN_EXE_psync-client");

/// Runs `bin` with `args` and extra environment, to completion.
fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run the binary")
}

/// A usage error is one line `NAME: error: ...` naming the flag, exit 2,
/// whether clap or the program found it.
#[test]
fn usage_errors_have_one_shape() {
    let cases: &[(&str, &str, &[&str], &str)] = &[
        (BIN, "psync-server", &["--prot", "1"], "--prot"),
        (
            BIN,
            "psync-server",
            &["--stats-interval", "1e-9"],
            "--stats-interval",
        ),
        (
            BIN,
            "psync-server",
            &["--stats-interval", "0.5"],
            "--stats-interval",
        ),
        (
            BIN,
            "psync-server",
            &["--capacity", "18446744073709551615"],
            "--capacity",
        ),
        (BIN, "psync-server", &["--batch", "5000"], "--batch"),
        (BIN, "psync-server", &["--rcvbuf", "3"], "--rcvbuf"),
        (
            BIN,
            "psync-server",
            &["--max-pending-per-ip", "20000000"],
            "--max-pending-per-ip",
        ),
        (BIN, "psync-server", &["-4", "-6"], "--ipv6-only"),
        (
            CLIENT,
            "psync-client",
            &["--self", "1", "--peer", "2"],
            "--server",
        ),
        (
            CLIENT,
            "psync-client",
            &[
                "--server",
                "127.0.0.1:9",
                "--self",
                "1",
                "--peer",
                "2",
                "--timeout",
                "forever",
            ],
            "--timeout",
        ),
        (
            CLIENT,
            "psync-client",
            &["--server", "127.0.0.1:9", "--self", "1", "--peer", "x"],
            "--peer",
        ),
    ];
    for (bin, name, args, flag) in cases {
        let out = run(bin, args, &[]);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {err}");
        assert!(
            lines[0].starts_with(&format!("{name}: error: ")) && lines[0].contains(flag),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn version_names_the_commit_and_features() {
    for (bin, name) in [(BIN, "psync-server"), (CLIENT, "psync-client")] {
        let out = run(bin, &["--version"], &[]);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let prefix = format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(text.starts_with(&prefix), "{text}");
        assert!(text.contains(", features: "), "{text}");
    }
}

/// Every flag can come from PSYNC_SERVER_<FLAG>, and --help says so.
#[test]
fn flags_come_from_the_environment() {
    let help = String::from_utf8(run(BIN, &["--help"], &[]).stdout).unwrap();
    for var in [
        "PSYNC_SERVER_PORT",
        "PSYNC_SERVER_TTL",
        "PSYNC_SERVER_METRICS",
        "PSYNC_SERVER_VERBOSE",
    ] {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "{var} missing from --help"
        );
    }
    assert!(
        help.lines().all(|l| l.chars().count() <= 100),
        "help wraps at 100 columns"
    );
    let mut child = Command::new(BIN)
        .env_remove("RUST_LOG")
        .envs([
            ("PSYNC_SERVER_PORT", "0"),
            ("PSYNC_SERVER_BIND", "127.0.0.1"),
            ("PSYNC_SERVER_IPV4_ONLY", "true"),
            ("PSYNC_SERVER_TTL", "500ms"),
            ("PSYNC_SERVER_VERBOSE", "1"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Proc {
        stderr: BufReader::new(child.stderr.take().unwrap()),
        child,
    };
    let addr = p.listening();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let (ok, rest) = p.terminate();
    assert!(ok);
    // -v from the environment shows the startup line, with the TTL as set.
    assert!(rest.contains("ttl 500ms,"), "{rest}");
    // A bad value from the environment is named like a bad flag.
    let out = run(BIN, &[], &[("PSYNC_SERVER_TTL", "soon")]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.starts_with("psync-server: error: ") && err.contains("--ttl"),
        "{err}"
    );
}

/// Bare numbers keep their old meaning (seconds), units work, and the
/// figure printed at -v says what was understood.
#[test]
fn durations_with_and_without_units() {
    for (given, shown) in [("30", "ttl 30s,"), ("2m", "ttl 2m,"), ("1.5", "ttl 1.5s,")] {
        let mut p = Proc::start(&["-4v", "-p", "0", "--bind", "127.0.0.1", "--ttl", given]);
        p.listening();
        let (ok, rest) = p.terminate();
        assert!(ok && rest.contains(shown), "--ttl {given}: {rest}");
    }
}

#[test]
fn man_page_and_completions_come_from_the_flags() {
    for (bin, name) in [(BIN, "psync-server"), (CLIENT, "psync-client")] {
        let out = run(bin, &["--generate-man"], &[]);
        assert!(out.status.success());
        let man = String::from_utf8(out.stdout).unwrap();
        assert!(man.contains(&format!(".TH {name} 1")), "{man}");
        let out = run(bin, &["--generate-completions", "bash"], &[]);
        assert!(out.status.success());
        let bash = String::from_utf8(out.stdout).unwrap();
        assert!(
            bash.contains(&format!("_{}", name.replace('-', "__"))),
            "{bash}"
        );
    }
    let man = String::from_utf8(run(BIN, &["--generate-man"], &[]).stdout).unwrap();
    for flag in [
        "replay\\-ttl",
        "stats\\-interval",
        "max\\-pending\\-per\\-ip",
        "PSYNC_SERVER_PORT",
    ] {
        assert!(man.contains(flag), "{flag} missing from the man page");
    }
    // Hidden from the help, not from use.
    let help = String::from_utf8(run(BIN, &["--help"], &[]).stdout).unwrap();
    assert!(!help.contains("generate"));
}

/// RUST_LOG works without -v (and refines it): debug lines per match appear.
#[test]
fn rust_log_works_next_to_v() {
    let mut child = Command::new(BIN)
        .args(["-4", "-p", "0", "--bind", "127.0.0.1"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Proc {
        stderr: BufReader::new(child.stderr.take().unwrap()),
        child,
    };
    let addr = p.listening();
    run_pair(addr);
    let (ok, rest) = p.terminate();
    assert!(ok && rest.contains("matched 127.0.0.1:"), "{rest}");
}

/// Reads stderr lines until one contains `needle`; false if the process ended.
fn wait_for(p: &mut Proc, needle: &str) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match p.stderr.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.contains(needle) => return true,
            Ok(_) => {}
        }
    }
}

/// SIGUSR1 prints the counters (from the loop), SIGHUP reloads (nothing to
/// reload yet, said so), SIGUSR2 is ignored: the server keeps serving
/// through all three, and SIGTERM still ends it with its final counters.
#[test]
fn sigusr1_sighup_and_stray_signals_keep_it_running() {
    let mut p = Proc::start(&["-4", "-p", "0", "--bind", "127.0.0.1"]);
    let addr = p.listening();
    run_pair(addr);
    signal(p.child.id(), libc::SIGUSR1);
    assert!(
        wait_for(&mut p, "counters received=2 "),
        "SIGUSR1 prints the counters"
    );
    signal(p.child.id(), libc::SIGHUP);
    assert!(
        wait_for(&mut p, "reload: nothing to reload"),
        "SIGHUP is answered"
    );
    signal(p.child.id(), libc::SIGUSR2);
    assert!(
        wait_for(&mut p, "SIGUSR2 ignored"),
        "stray signals are logged"
    );
    run_pair(addr);
    let (ok, rest) = p.terminate();
    assert!(ok, "SIGTERM exits 0");
    assert!(rest.contains("final counters: received=4 "), "{rest}");
}

/// SIGQUIT ends the server like SIGTERM: exit 0 with the final counters
/// (its default action would dump core and print nothing).
#[test]
fn sigquit_ends_with_final_counters() {
    let mut p = Proc::start(&["-4", "-p", "0", "--bind", "127.0.0.1"]);
    let addr = p.listening();
    run_pair(addr);
    signal(p.child.id(), libc::SIGQUIT);
    let status = p.child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut p.stderr, &mut rest).unwrap();
    assert!(status.success(), "{status:?}: {rest}");
    assert!(rest.contains("final counters: received=2 "), "{rest}");
}

/// A closed stderr (the reader went away) makes every later write fail with
/// EPIPE; the server must shrug it off, not panic (exit 101).
#[test]
fn a_closed_stderr_does_not_panic() {
    let mut child = Command::new(BIN)
        .args([
            "-4v",
            "-p",
            "0",
            "--bind",
            "127.0.0.1",
            "--stats-interval",
            "1s",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr: SocketAddr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
        if let Some(a) = line.trim().strip_prefix("psync-server: listening on udp ") {
            break a.parse().unwrap();
        }
    };
    // Close the only read end of the server's stderr pipe.
    drop(stderr);
    run_pair(addr);
    signal(pid, libc::SIGUSR1);
    signal(pid, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(1200));
    run_pair(addr);
    signal(pid, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exit status with a closed stderr");
}

/// A port where nothing listens answers with ICMP port unreachable: the
/// client says so and exits 3, long before its --timeout.
#[test]
fn a_refusing_server_port_fails_the_client_with_3() {
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let server = format!("127.0.0.1:{port}");
    let out = run(
        CLIENT,
        &[
            "--server",
            &server,
            "--self",
            "1",
            "--peer",
            "2",
            "--timeout",
            "60s",
        ],
        &[],
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("psync-client: error: the rendezvous server") && err.contains("refused"),
        "{err}"
    );
}

/// Issue 14, finding 5: sizes that once panicked ("capacity overflow"),
/// aborted on allocation, wrapped the table arithmetic or spun at 100% CPU
/// now get one line naming `--capacity` and a non-zero exit: refused by the
/// flag's range, or by the engine when the memory cannot be had. Run under
/// a 2 GiB address-space limit (`ulimit -v`), so that no value can succeed
/// by luck of this machine's memory, and with a deadline, so that a hang
/// fails the test instead of stalling it.
#[test]
fn absurd_sizes_are_one_line_errors_under_a_memory_limit() {
    for capacity in [
        "18446744073709551615", // 2^64 - 1: "capacity overflow" before
        "12297829382473034410", // 0xAAAAAAAAAAAAAAAA: wrapped, then panicked
        "1099511627776",        // 2^40: aborted on allocation before
        "2147483649",           // one above the largest
        "2147483648",           // the largest: about 128 GiB
        "1000000000",           // aborted: "memory allocation of 27000000018 bytes failed"
        "100000000",            // 5.8 GiB: over the limit set here
    ] {
        let cmd =
            format!("ulimit -v 2097152; exec {BIN} -p 0 --bind 127.0.0.1 --capacity {capacity}");
        let mut child = Command::new("sh")
            .args(["-c", &cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("--capacity {capacity}: still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(
            status.code(),
            Some(2),
            "--capacity {capacity}: {status} {err}"
        );
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "--capacity {capacity}: one line, got {err}");
        assert!(
            lines[0].starts_with("psync-server: error: ") && lines[0].contains("--capacity"),
            "--capacity {capacity}: {err}"
        );
    }
}

/// Datagrams the kernel drops at the server's socket (receive buffer full)
/// appear in `kernel_drops`: the server is stopped (SIGSTOP) while a burst
/// overflows its smallest allowed buffer, then continued.
#[test]
fn kernel_drops_are_counted() {
    let mut p = Proc::start(&[
        "-4",
        "-p",
        "0",
        "--bind",
        "127.0.0.1",
        "--rcvbuf",
        "4K",
        "--rate-limit",
        "0",
    ]);
    let addr = p.listening();
    signal(p.child.id(), libc::SIGSTOP);
    let s = socket("127.0.0.1", Duration::from_secs(1));
    let sent = 5000u64;
    for i in 0..sent {
        s.send_to(&[0u8; 3], addr)
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
    }
    signal(p.child.id(), libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, rest) = p.terminate();
    assert!(ok, "{rest}");
    let field = |name: &str| -> u64 {
        let at = rest
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("no {name} in {rest}"));
        rest[at + name.len() + 2..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (received, drops) = (field("received"), field("kernel_drops"));
    assert!(drops > 0, "a 4 KiB buffer held {sent} datagrams? {rest}");
    assert_eq!(received + drops, sent, "{rest}");
}
