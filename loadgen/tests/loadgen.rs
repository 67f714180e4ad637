//! End-to-end: the real `psync-loadgen` binary against a real in-process
//! `psync::Server` on loopback (and against two fake servers, to show that
//! wrong or missing replies fail the run).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use psync::limit::RateLimit;
use psync::{Counters, Reply, Server, ServerConfig, ShutdownHandle};

const LOADGEN: &str = env!("CARGO_BIN_EXE_psync-loadgen");

/// A psync server on 127.0.0.1:0 in a thread: the defaults, with a small
/// table, no periodic stats and the per-source limits off (every synthetic
/// peer shares 127.0.0.1, which the limits would treat as one flooding host).
struct TestServer {
    addr: SocketAddr,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Counters>>,
}

impl TestServer {
    fn start(port_range: Option<(u16, u16)>) -> TestServer {
        Self::start_with(port_range, 1)
    }

    /// With `workers` worker loops (`--workers`).
    fn start_with(port_range: Option<(u16, u16)>, workers: usize) -> TestServer {
        let mut cfg = ServerConfig {
            workers,
            ..ServerConfig::default()
        };
        cfg.engine.capacity = 1 << 14;
        cfg.engine.limits = psync::engine::SourceLimits::OFF;
        if let Some((lo, hi)) = port_range {
            cfg.engine.port_lo = lo;
            cfg.engine.port_hi = hi;
        }
        cfg.rate_limit = RateLimit::OFF;
        cfg.stats_interval = None;
        cfg.bind = vec!["127.0.0.1:0".parse().unwrap()];
        let mut server = Server::bind(&cfg).expect("server binds");
        let addr = server.local_addrs()[0];
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().expect("server runs"));
        TestServer {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Counters {
        self.handle.shutdown();
        self.thread.take().unwrap().join().expect("server thread")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

/// One load run at a time: two machine cores are few, and parallel runs
/// would only add noise to each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn loadgen(server: SocketAddr, args: &[&str]) -> Output {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(LOADGEN)
        .arg("--server")
        .arg(server.to_string())
        .args(["--json", "--quiet"])
        .args(args)
        .output()
        .expect("run psync-loadgen");
    eprintln!(
        "psync-loadgen {args:?}: {}\nstdout: {}stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The number after `"key":` in the one-line JSON report.
fn field(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    let rest = &json[at..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

#[test]
fn modest_open_loop_rate_completes_every_pair() {
    let server = TestServer::start(None);
    let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hgrm = dir.join("run.hgrm");
    let svg = dir.join("run.svg");
    let out = loadgen(
        server.addr,
        &[
            "--rate",
            "2000",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--sockets",
            "16",
            // Generous: the assertion is "no loss", not "fast", on a shared machine.
            "--timeout",
            "5000",
            "--hgrm",
            hgrm.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    let counters = server.stop();
    assert_eq!(out.status.code(), Some(0));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(field(&json, "wrong"), 0.0);
    assert_eq!(field(&json, "lost"), 0.0);
    // Open loop: every pair of the 2-second schedule was sent (a process
    // stalled past the window's end may leave a few unsent; they are
    // counted) and every pair sent completed.
    let issued = field(&json, "issued");
    assert_eq!(issued + field(&json, "unsent"), 4000.0);
    assert!(issued >= 3900.0, "{json}");
    assert_eq!(field(&json, "completed"), issued);
    for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(field(&json, k) > 0.0, "{k}");
    }
    assert!(field(&json, "p50") <= field(&json, "p99"));
    assert!(field(&json, "p99") <= field(&json, "max"));
    // The server matched each pair once (warmup included) and dropped nothing.
    assert!(counters.engine.matched >= 4000, "{counters:?}");
    assert_eq!(
        counters.engine.bad_size + counters.engine.self_pair + counters.engine.table_full,
        0
    );

    let hgrm_text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(
        hgrm_text.contains("Total count    =         4000"),
        "{hgrm_text}"
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("<polyline"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn closed_loop_at_max_rate_gets_no_wrong_reply() {
    let server = TestServer::start(None);
    let out = loadgen(
        server.addr,
        &[
            "--rate",
            "max",
            "--window",
            "64",
            "--duration",
            "1.5",
            "--warmup",
            "0.3",
        ],
    );
    let counters = server.stop();
    assert_eq!(out.status.code(), Some(0));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(field(&json, "wrong"), 0.0);
    assert!(field(&json, "completed") > 100.0, "{json}");
    assert!(field(&json, "pairs_per_sec") > 0.0);
    assert!(counters.engine.matched as f64 >= field(&json, "completed"));
}

/// Two load threads against two server workers: one merged report, every
/// pair of both threads' schedules completed and checked.
#[test]
fn threads_send_their_own_pairs_and_merge_one_report() {
    let server = TestServer::start_with(None, 2);
    let out = loadgen(
        server.addr,
        &[
            "--threads",
            "2",
            "--rate",
            "2000",
            "--duration",
            "1.5",
            "--warmup",
            "0.3",
            "--sockets",
            "8",
            "--retransmit",
            "0.1",
            "--pending",
            "100",
            "--timeout",
            "5000",
        ],
    );
    let counters = server.stop();
    assert_eq!(out.status.code(), Some(0));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(field(&json, "wrong"), 0.0);
    assert_eq!(field(&json, "lost"), 0.0);
    // The two threads' schedules add up to the rate asked for.
    assert_eq!(field(&json, "rate"), 2000.0);
    assert_eq!(field(&json, "sockets"), 16.0);
    let issued = field(&json, "issued");
    assert_eq!(issued + field(&json, "unsent"), 3000.0);
    assert_eq!(field(&json, "completed"), issued);
    assert_eq!(field(&json, "pending_sent"), 100.0);
    assert!(field(&json, "p50") > 0.0 && field(&json, "p50") <= field(&json, "max"));
    // Warmup and measured pairs, each matched once.
    assert!(counters.engine.matched as f64 >= issued, "{counters:?}");
    assert_eq!(counters.engine.pending, 100);
}

#[test]
fn retransmits_malformed_datagrams_and_preload_are_not_wrong() {
    let server = TestServer::start(Some((20000, 20099)));
    let out = loadgen(
        server.addr,
        &[
            "--rate",
            "2000",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--sockets",
            "8",
            "--timeout",
            "5000",
            "--retransmit",
            "0.2",
            "--bad-ratio",
            "0.25",
            "--pending",
            "300",
            "--port-range",
            "20000-20099",
        ],
    );
    let counters = server.stop();
    assert_eq!(out.status.code(), Some(0));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(field(&json, "wrong"), 0.0);
    assert_eq!(field(&json, "lost"), 0.0);
    assert_eq!(field(&json, "completed"), field(&json, "issued"));
    assert_eq!(field(&json, "issued") + field(&json, "unsent"), 2000.0);
    let replayed = field(&json, "replayed");
    assert!(replayed > 0.0, "{json}");
    assert_eq!(field(&json, "replay_missing"), 0.0);
    assert_eq!(counters.engine.replayed as f64, replayed);
    // Every malformed datagram reached the server and was dropped as such.
    let bad = field(&json, "bad_sent");
    assert!(bad > 0.0);
    assert_eq!(
        (counters.engine.bad_size + counters.engine.self_pair) as f64,
        bad
    );
    // The preload registered and nothing matched it.
    assert_eq!(field(&json, "pending_sent"), 300.0);
    assert_eq!(
        counters.engine.registered,
        300 + counters.engine.matched,
        "{counters:?}"
    );
}

/// A fake server that answers every request at once, naming the asker as
/// its own partner: a server bug the load generator must catch.
fn fake_server(answer: bool) -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !flag.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if n == 8 && answer {
                let reply = Reply {
                    src_port: 3000,
                    dst_port: 4000,
                    peer: from,
                };
                let mut out = [0u8; 32];
                let len = reply.emit(&mut out);
                let _ = socket.send_to(&out[..len], from);
            }
        }
    });
    (addr, stop, thread)
}

#[test]
fn wrong_replies_fail_the_run() {
    let (addr, stop, thread) = fake_server(true);
    let out = loadgen(
        addr,
        &[
            "--rate",
            "500",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--timeout",
            "100",
        ],
    );
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(field(&json, "wrong") > 0.0);
    assert!(field(&json, "partner_is_self") > 0.0);
    assert_eq!(field(&json, "completed"), 0.0);
}

#[test]
fn a_silent_server_loses_every_pair_and_fails_the_run() {
    let (addr, stop, thread) = fake_server(false);
    let out = loadgen(
        addr,
        &[
            "--rate",
            "200",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--timeout",
            "100",
        ],
    );
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(field(&json, "lost"), field(&json, "issued"));
    assert_eq!(field(&json, "issued") + field(&json, "unsent"), 100.0);
    assert_eq!(field(&json, "completed"), 0.0);
    assert_eq!(field(&json, "wrong"), 0.0);
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for args in [
        &["--rate", "0"][..],
        &["--rate", "1000", "--window", "4"],
        &["--rate", "max", "--window", "100", "--sockets", "4"],
        &["--sockets", "1"],
        &["--retransmit", "1.5"],
        &["--port-range", "5-5"],
        &["--threads", "0"],
        &["--threads", "65"],
        &["--threads", "4", "--rate", "max", "--window", "3"],
    ] {
        let out = loadgen(addr, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

/// A dead server (a port nobody listens on) is the first thing said, in one
/// error line, and the report's other warnings (such as raising --sockets)
/// do not appear, since they would only follow from it.
#[test]
fn a_dead_server_is_said_first() {
    let addr = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let out = Command::new(LOADGEN)
        .args([
            "--server",
            &addr.to_string(),
            "--rate",
            "20000",
            "--duration",
            "300ms",
        ])
        .args([
            "--warmup",
            "0",
            "--timeout",
            "50ms",
            "--sockets",
            "4",
            "--quiet",
        ])
        .output()
        .expect("run psync-loadgen");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("psync-loadgen: error: no pair completed: no reply from"),
        "{err}"
    );
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        !report.contains("--sockets") && !err.contains("--sockets"),
        "{report}{err}"
    );
}

/// The shared CLI style: one error line with the flag, exit 2; --version
/// with the commit; durations with units, bare --timeout still milliseconds.
#[test]
fn cli_style() {
    for (args, flag) in [
        (
            &["--server", "127.0.0.1:9", "--duration", "1e-9"][..],
            "--duration",
        ),
        (
            &["--server", "127.0.0.1:9", "--timeout", "20m"],
            "--timeout",
        ),
        (
            &["--server", "127.0.0.1:9", "--sockets", "5000"],
            "--sockets",
        ),
        (&["--rate", "5"], "--server"),
    ] {
        let out = Command::new(LOADGEN).args(args).output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("psync-loadgen: error: ") && err.contains(flag),
            "{err}"
        );
    }
    let out = Command::new(LOADGEN).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("psync-loadgen ") && text.contains("(commit "),
        "{text}"
    );
    let help =
        String::from_utf8(Command::new(LOADGEN).arg("--help").output().unwrap().stdout).unwrap();
    assert!(help.contains("[env: PSYNC_LOADGEN_TIMEOUT="), "{help}");
}
