//! Helpers shared by the integration tests: start a server on loopback, make
//! client sockets, build requests.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use psync::{Counters, PeerId, Request, Server, ServerConfig, ShutdownHandle};

/// A server running on its own thread; stopped and joined on drop.
pub struct TestServer {
    /// Bound addresses, one per family asked for.
    pub addrs: Vec<SocketAddr>,
    /// The metrics endpoint, when the config asked for one.
    pub metrics_addr: Option<SocketAddr>,
    /// The `stun_port` addresses, when the config asked for one.
    pub stun_addrs: Vec<SocketAddr>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Counters>>,
}

impl TestServer {
    /// Starts a server on 127.0.0.1 (port 0) with `cfg` (its `bind` is replaced).
    pub fn start(cfg: ServerConfig) -> TestServer {
        Self::start_on(cfg, &["127.0.0.1:0"])
    }

    /// Starts a server bound to each of `binds`.
    pub fn start_on(mut cfg: ServerConfig, binds: &[&str]) -> TestServer {
        cfg.bind = binds.iter().map(|b| b.parse().unwrap()).collect();
        Self::from_server(Server::bind(&cfg).expect("server binds"))
    }

    /// Runs a server already bound (to look at it first).
    pub fn from_server(mut server: Server) -> TestServer {
        let addrs = server.local_addrs();
        let metrics_addr = server.metrics_addr();
        let stun_addrs = server.stun_addrs();
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run().expect("server runs"));
        TestServer {
            addrs,
            metrics_addr,
            stun_addrs,
            handle,
            thread: Some(thread),
        }
    }

    /// The first bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Stops the server and returns its final counters.
    pub fn stop(mut self) -> Counters {
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

/// A config for tests: small tables, fixed seed, no periodic stats, and the
/// per-source limits off (every test client is 127.0.0.1; the limit tests
/// turn them on).
pub fn config() -> ServerConfig {
    let engine = psync::EngineConfig {
        capacity: 1 << 14,
        seed: Some(7),
        limits: psync::engine::SourceLimits::OFF,
        ..Default::default()
    };
    ServerConfig {
        engine,
        stats_interval: None,
        rcvbuf: 1 << 20,
        sndbuf: 1 << 20,
        rate_limit: psync::limit::RateLimit::OFF,
        ..Default::default()
    }
}

/// A UDP socket on `ip` (port 0) with a read timeout.
pub fn socket(ip: &str, timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).expect("bind client socket");
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// The 8 request bytes for numeric IDs.
pub fn request(self_id: u32, peer_id: u32) -> [u8; 8] {
    Request {
        self_id: PeerId::from_u32(self_id),
        peer_id: PeerId::from_u32(peer_id),
    }
    .emit()
}

/// Receives one datagram, or `None` after the socket's timeout.
pub fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    match s.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

/// Asserts that every received datagram ended in exactly one outcome counter.
pub fn assert_accounted(c: &Counters) {
    let outcomes = c.engine.bad_size
        + c.engine.self_pair
        + c.engine.bad_family
        + c.engine.bad_source
        + c.engine.table_full
        + c.engine.per_prefix_limit
        + c.io.rate_limited
        + c.engine.per_ip_limit
        + c.engine.registered
        + c.engine.refreshed
        + c.engine.matched
        + c.engine.replayed
        + c.io.stun_answered
        + c.io.stun_refused
        + c.io.seed_refused
        + c.io.v2_malformed
        + c.io.v2_bad_source
        + c.io.auth_failed_unknown_key
        + c.io.auth_failed_expired
        + c.io.auth_failed_bad_mac
        + c.io.cookie_sent;
    assert_eq!(c.received, outcomes, "every datagram accounted for: {c}");
}
