//! Prometheus metrics over HTTP, served from the server's own `mio` loop.
//!
//! `GET /metrics` returns the text exposition format. The endpoint is small
//! on purpose: one request per connection (`Connection: close`), at most
//! [`MAX_CONNS`] connections, requests of at most [`MAX_REQUEST`] bytes, and
//! a connection that has not finished within [`CONN_DEADLINE`] is closed. A
//! slow or hostile scraper therefore costs bounded memory and never blocks
//! the UDP path: every socket here is nonblocking, and the loop services it
//! between UDP batches. Anything but `GET /metrics` gets 404, a malformed or
//! oversized request 400; then the connection closes.
//!
//! Rendering formats text and allocates, which is fine: it happens per
//! scrape, never per packet.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::stats::{Counters, WaitHistogram};

/// Most metrics connections open at once; more wait in the listen backlog.
pub const MAX_CONNS: usize = 16;
/// Longest request head accepted.
pub const MAX_REQUEST: usize = 2048;
/// A connection must be served within this time or it is closed.
pub const CONN_DEADLINE: Duration = Duration::from_secs(5);

/// First token of the metrics listener; connections follow it. Far above
/// the UDP sockets' tokens.
pub const TOKEN_BASE: usize = 1 << 30;

struct Conn {
    stream: TcpStream,
    request: Box<[u8; MAX_REQUEST]>,
    read: usize,
    response: Vec<u8>,
    written: usize,
    deadline: Instant,
}

/// What the metrics page shows: a copy of the server's state, taken when a
/// metrics connection is ready (no allocation).
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    /// All counters, gauges refreshed.
    pub counters: Counters,
    /// Pending capacity.
    pub capacity: usize,
    /// Replay cache entries held.
    pub replay_entries: usize,
    /// How long first peers waited for their partner.
    pub wait: WaitHistogram,
    /// Seconds since start.
    pub uptime: f64,
}

/// The metrics listener and its connections.
pub struct Metrics {
    listener: TcpListener,
    conns: Slab<Conn>,
    local: SocketAddr,
    /// Connections refused or closed for misbehaving, for the page itself.
    rejected: u64,
}

impl Metrics {
    /// Binds `addr` and registers the listener with `registry`.
    pub fn bind(addr: SocketAddr, registry: &Registry) -> io::Result<Metrics> {
        let mut listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        registry.register(&mut listener, Token(TOKEN_BASE), Interest::READABLE)?;
        Ok(Metrics {
            listener,
            conns: Slab::with_capacity(MAX_CONNS),
            local,
            rejected: 0,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// True for the listener's and the connections' tokens.
    pub fn owns(token: Token) -> bool {
        token.0 >= TOKEN_BASE
    }

    /// Handles readiness of `token`: accepts, reads, answers, closes.
    pub fn ready(&mut self, registry: &Registry, token: Token, now: Instant, snapshot: &Snapshot) {
        if token.0 == TOKEN_BASE {
            self.accept(registry, now);
            return;
        }
        let key = token.0 - TOKEN_BASE - 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // An I/O error ends the connection like a finished one.
        if drive(conn, snapshot).unwrap_or(true) {
            self.close(registry, key);
        }
    }

    fn accept(&mut self, registry: &Registry, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNS {
                        // Full: close at once rather than queue without bound.
                        self.rejected += 1;
                        drop(stream);
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    let token = Token(TOKEN_BASE + 1 + entry.key());
                    if registry
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        request: Box::new([0; MAX_REQUEST]),
                        read: 0,
                        response: Vec::new(),
                        written: 0,
                        deadline: now + CONN_DEADLINE,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNABORTED and friends: that connection is gone; go on.
                Err(_) => return,
            }
        }
    }

    fn close(&mut self, registry: &Registry, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }

    /// Closes connections past their deadline. Returns the next deadline.
    pub fn expire(&mut self, registry: &Registry, now: Instant) -> Option<Instant> {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            self.rejected += 1;
            self.close(registry, key);
        }
        self.conns.iter().map(|(_, c)| c.deadline).min()
    }
}

/// Reads the request, then writes the response. Ok(true) when the connection
/// is finished (answered or hopeless).
fn drive(conn: &mut Conn, snapshot: &Snapshot) -> io::Result<bool> {
    if conn.response.is_empty() {
        loop {
            if conn.read == MAX_REQUEST {
                conn.response = response(400, "Bad Request", "request too large\n");
                break;
            }
            match conn.stream.read(&mut conn.request[conn.read..]) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    conn.read += n;
                    if let Some(head) = complete_head(&conn.request[..conn.read]) {
                        conn.response = answer(head, snapshot);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    while conn.written < conn.response.len() {
        match conn.stream.write(&conn.response[conn.written..]) {
            Ok(0) => return Ok(true),
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The request head up to the blank line, once it has all arrived.
fn complete_head(buf: &[u8]) -> Option<&[u8]> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|end| &buf[..end])
}

fn answer(head: &[u8], snapshot: &Snapshot) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    let valid = matches!(version, Some(v) if v.starts_with(b"HTTP/1.")) && parts.next().is_none();
    match (method, path) {
        _ if !valid => response(400, "Bad Request", "malformed request line\n"),
        (Some(b"GET"), Some(b"/metrics")) => {
            let body = render(snapshot);
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(body.as_bytes());
            out
        }
        (Some(b"GET"), _) => response(404, "Not Found", "try /metrics\n"),
        _ => response(400, "Bad Request", "only GET /metrics is served\n"),
    }
}

fn response(code: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Renders the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let c = &s.counters;
    let mut out = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP psync_{name} {help}\n# TYPE psync_{name} counter\npsync_{name} {value}\n"
        );
    };
    counter("received_total", "Datagrams received.", c.received);
    counter(
        "registered_total",
        "New pending registrations.",
        c.registered,
    );
    counter(
        "refreshed_total",
        "Pending registrations refreshed by a repeated request.",
        c.refreshed,
    );
    counter("matched_total", "Pairs matched.", c.matched);
    counter(
        "replayed_total",
        "Replies resent to retransmitted requests after a match.",
        c.replayed,
    );
    counter(
        "expired_total",
        "Pending registrations that expired unmatched.",
        c.expired,
    );
    counter(
        "replay_full_total",
        "Matches not remembered for replay because the replay cache was full.",
        c.replay_full,
    );
    counter("sent_total", "Replies handed to the kernel.", c.sent);
    counter(
        "send_errors_total",
        "Replies the kernel refused with a hard error.",
        c.send_errors,
    );
    counter(
        "send_dropped_total",
        "Replies dropped because the send queue was full.",
        c.send_dropped,
    );
    counter(
        "recv_errors_total",
        "Receive calls that failed unexpectedly.",
        c.recv_errors,
    );
    counter(
        "stun_answered_total",
        "STUN Binding requests answered.",
        c.stun_answered,
    );
    let _ = write!(
        out,
        "# HELP psync_dropped_total Datagrams dropped without a reply, by reason.\n\
         # TYPE psync_dropped_total counter\n"
    );
    for (reason, value) in [
        ("bad_size", c.bad_size),
        ("self_pair", c.self_pair),
        ("bad_family", c.bad_family),
        ("table_full", c.table_full),
        ("rate_limited", c.rate_limited),
        ("per_ip_limit", c.per_ip_limit),
        ("stun_refused", c.stun_refused),
    ] {
        let _ = writeln!(out, "psync_dropped_total{{reason=\"{reason}\"}} {value}");
    }
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP psync_{name} {help}\n# TYPE psync_{name} gauge\npsync_{name} {value}\n"
        );
    };
    gauge(
        "pending",
        "Pending registrations held now.",
        c.pending as f64,
    );
    gauge(
        "capacity",
        "Most pending registrations held at once.",
        s.capacity as f64,
    );
    gauge(
        "replay_entries",
        "Matched requests remembered for replay.",
        s.replay_entries as f64,
    );
    gauge(
        "uptime_seconds",
        "Seconds since the server started.",
        s.uptime,
    );
    let _ = write!(
        out,
        "# HELP psync_pair_wait_seconds How long the first peer of a pair waited for the second, \
         from its last registration or refresh to the match.\n\
         # TYPE psync_pair_wait_seconds histogram\n"
    );
    let mut cumulative = 0;
    for (le_ms, count) in s.wait.buckets() {
        cumulative += count;
        match le_ms {
            Some(ms) => {
                let _ = writeln!(
                    out,
                    "psync_pair_wait_seconds_bucket{{le=\"{}\"}} {cumulative}",
                    ms as f64 / 1000.0
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "psync_pair_wait_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
                );
            }
        }
    }
    let _ = write!(
        out,
        "psync_pair_wait_seconds_sum {}\npsync_pair_wait_seconds_count {cumulative}\n",
        s.wait.sum_ms() as f64 / 1000.0
    );
    out
}
