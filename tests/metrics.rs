//! The Prometheus endpoint over a real TCP connection: the counters after
//! real traffic, 404 and 400 for bad requests, and bounded connections.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use psync::metrics::{MAX_CONNS, MAX_REQUEST};
use util::{config, recv, request, socket, TestServer};

fn start() -> (TestServer, SocketAddr) {
    let mut cfg = config();
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start(cfg);
    let addr = server.metrics_addr.expect("metrics bound");
    (server, addr)
}

fn get(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
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
fn bad_requests_get_400_or_404() {
    let (_server, metrics) = start();
    assert!(get(metrics, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(get(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(get(metrics, b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = vec![b'A'; MAX_REQUEST + 100];
    assert!(get(metrics, &huge).starts_with("HTTP/1.1 400"));
    // And it still serves afterwards.
    assert!(get(metrics, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
}

#[test]
fn idle_connections_are_bounded() {
    let (_server, metrics) = start();
    // Hold more idle connections than allowed; the extra ones are closed at
    // once, and a scrape still works once the idle ones are gone.
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
    drop(idle);
    std::thread::sleep(Duration::from_millis(100));
    assert!(get(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
}

#[test]
fn a_slow_client_is_cut_off() {
    let (_server, metrics) = start();
    let mut slow = TcpStream::connect(metrics).unwrap();
    // Half a request line, then nothing: the server must not wait forever.
    slow.write_all(b"GET /metr").unwrap();
    slow.set_read_timeout(Some(psync::metrics::CONN_DEADLINE * 3))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        start.elapsed() < psync::metrics::CONN_DEADLINE * 3,
        "closed by the deadline, not by the test's own timeout"
    );
}
