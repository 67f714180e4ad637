//! The `psync-server` binary as an operator runs it: the original command
//! line, signals and final counters, and one-line errors for bad settings.

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
