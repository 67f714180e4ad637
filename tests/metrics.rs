//! The HTTP endpoint over real TCP connections: the counters after real
//! traffic, build and process metrics, health checks, answers to bad
//! requests, and clients that cannot starve a scrape (slowloris, bodies,
//! giant headers).

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use psync::metrics::{HEAD_DEADLINE, MAX_CONNS, MAX_REQUEST};
use socket2::{Domain, Socket, Type};
use util::{config, recv, request, socket, TestServer};

fn start() -> (TestServer, SocketAddr) {
    let mut cfg = config();
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start(cfg);
    let addr = server.metrics_addr.expect("metrics bound");
    (server, addr)
}

fn get(addr: SocketAddr, raw: &[u8]) -> String {
    exchange(addr, raw).unwrap_or_else(|e| panic!("no clean response: {e}"))
}

/// Sends `raw` and reads the response to the end; an error (a reset)
/// means the response was not delivered cleanly.
fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A TCP connection from `from` (any 127.x address) to `to`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// The body of a complete response, checked against its Content-Length.
fn body(response: &str) -> &str {
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "the whole body arrived");
    body
}

fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_show_real_traffic() {
    let (server, metrics) = start();
    let a = socket("127.0.0.1", Duration::from_secs(2));
    let b = socket("127.0.0.1", Duration::from_secs(2));
    a.send_to(&request(1, 2), server.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    b.send_to(&request(2, 1), server.addr()).unwrap();
    assert!(recv(&a).is_some() && recv(&b).is_some());
    a.send_to(&[0u8; 3], server.addr()).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let page = get(metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("# TYPE psync_matched_total counter"));
    assert_eq!(value(&page, "psync_received_total"), Some(3.0));
    assert_eq!(value(&page, "psync_matched_total"), Some(1.0));
    assert_eq!(value(&page, "psync_sent_total"), Some(2.0));
    assert_eq!(
        value(&page, "psync_dropped_total{reason=\"bad_size\"}"),
        Some(1.0)
    );
    assert_eq!(value(&page, "psync_pending"), Some(0.0));
    assert_eq!(value(&page, "psync_capacity"), Some((1 << 14) as f64));
    assert_eq!(value(&page, "psync_pair_wait_seconds_count"), Some(1.0));
    assert_eq!(
        value(&page, "psync_pair_wait_seconds_bucket{le=\"+Inf\"}"),
        Some(1.0)
    );
    // The first peer waited about 30 ms: not in the 1 ms bucket, in the 50 ms one.
    assert_eq!(
        value(&page, "psync_pair_wait_seconds_bucket{le=\"0.001\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&page, "psync_pair_wait_seconds_bucket{le=\"0.05\"}"),
        Some(1.0)
    );
}

#[test]
fn build_and_process_metrics() {
    let (_server, metrics) = start();
    let page = get(metrics, b"GET /metrics HTTP/1.1\r\n\r\n");
    let page = body(&page);
    let build = page
        .lines()
        .find(|l| l.starts_with("psync_build_info{"))
        .expect("psync_build_info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(
        build.contains("commit=\"") && build.contains("features=\""),
        "{build}"
    );
    assert!(build.ends_with("} 1"), "{build}");
    // The test process is the server's process: its numbers are real.
    let rss = value(page, "process_resident_memory_bytes").expect("rss");
    assert!(rss > 1e6, "resident memory {rss}");
    let fds = value(page, "process_open_fds").expect("open fds");
    assert!(fds >= 3.0, "open fds {fds}");
    assert!(value(page, "process_max_fds").expect("max fds") >= fds);
    assert!(value(page, "process_cpu_seconds_total").expect("cpu") >= 0.0);
    let start = value(page, "process_start_time_seconds").expect("start time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "start {start}, now {now}"
    );
    assert_eq!(value(page, "psync_ready"), Some(1.0));
}

#[test]
fn health_checks() {
    let (_server, metrics) = start();
    let health = get(metrics, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(body(&health), "ok\n");
    let ready = get(metrics, b"GET /readyz HTTP/1.0\r\n\r\n");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert_eq!(body(&ready), "ready\n");
    let head = get(metrics, b"HEAD /readyz HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
}

#[test]
fn bad_requests_get_a_clear_answer() {
    let (_server, metrics) = start();
    assert!(get(metrics, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(get(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(get(metrics, b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = vec![b'A'; MAX_REQUEST + 100];
    assert!(get(metrics, &huge).starts_with("HTTP/1.1 431"));
    // And it still serves afterwards.
    assert!(get(metrics, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
}

/// A request with a body the server never reads: the response must still
/// arrive whole, not be destroyed by a reset when the server closes.
#[test]
fn a_get_with_a_body_gets_its_response() {
    let (_server, metrics) = start();
    let payload = vec![b'x'; 256 << 10];
    let mut raw = format!(
        "GET /metrics HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    raw.extend_from_slice(&payload);
    let out = exchange(metrics, &raw).expect("a clean response, no reset");
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert!(body(&out).contains("psync_received_total"));
}

/// A header far beyond the limit: 431, delivered whole.
#[test]
fn a_giant_header_gets_its_response() {
    let (_server, metrics) = start();
    let mut raw = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
    raw.extend(std::iter::repeat_n(b'p', 200 << 10));
    raw.extend_from_slice(b"\r\n\r\n");
    let out = exchange(metrics, &raw).expect("a clean response, no reset");
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{}",
        &out[..out.len().min(200)]
    );
    body(&out);
}

#[test]
fn idle_connections_are_bounded() {
    let (_server, metrics) = start();
    // Hold more idle connections than allowed: the oldest ones are evicted
    // for the newest, and a scrape still works.
    let idle: Vec<TcpStream> = (0..MAX_CONNS + 8)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let closed = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 1];
            matches!((&**s).read(&mut buf), Ok(0))
        })
        .count();
    assert_eq!(closed, 8, "connections beyond {MAX_CONNS} are closed");
    assert!(get(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    drop(idle);
}

/// Sixty-four slowloris connections, each sending half a request line, do
/// not stop a scrape that comes after them.
#[test]
fn slow_connections_do_not_starve_a_scrape() {
    let (_server, metrics) = start();
    let slow: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(metrics).unwrap();
            s.write_all(b"GET /metr").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..5 {
        let page = get(metrics, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    }
    drop(slow);
}

/// An attacker on 127.0.0.2 keeps opening slow connections while a scraper
/// on 127.0.0.1 scrapes: every scrape is answered, because eviction takes
/// from the address holding the most connections.
#[test]
fn a_slowloris_that_keeps_coming_does_not_starve_a_scrape() {
    let (_server, metrics) = start();
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            let mut opened = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut s = connect_from("127.0.0.2", metrics);
                let _ = s.write_all(b"GET /metr");
                held.push_back(s);
                if held.len() > 64 {
                    held.pop_front();
                }
                opened += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..10 {
        let mut s = connect_from("127.0.0.1", metrics);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("a clean response");
        let page = String::from_utf8_lossy(&out);
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().unwrap();
    assert!(
        opened as usize > MAX_CONNS,
        "the attacker kept the table full ({opened})"
    );
}

#[test]
fn a_slow_client_gets_408_and_a_close() {
    let (_server, metrics) = start();
    let mut slow = TcpStream::connect(metrics).unwrap();
    // Half a request line, then nothing: the server must not wait forever.
    slow.write_all(b"GET /metr").unwrap();
    slow.set_read_timeout(Some(HEAD_DEADLINE * 5)).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    slow.read_to_end(&mut out).expect("a clean close");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(
        start.elapsed() < HEAD_DEADLINE * 5,
        "closed by the deadline, not by the test's own timeout"
    );
}
