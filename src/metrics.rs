//! Prometheus metrics and health checks over HTTP, served by a thread of its
//! own ([`MetricsServer`]) from copies of the counters that each worker
//! publishes between its batches, so that no scrape ever waits on a worker
//! and no worker ever waits on a scrape.
//!
//! Paths: `GET /metrics` (the text exposition format: the counters summed
//! over the workers, each worker's `received` and `matched` with a `worker`
//! label, build information and process metrics), `GET /healthz` (200 while
//! every worker's loop turns, 503 when one has not for [`STALLED`]:
//! liveness) and `GET /readyz` (200 once the UDP sockets are bound and every
//! worker's loop is turning, 503 once it is shutting down: readiness).
//! `HEAD` works on each. Anything else gets 404 or 400.
//!
//! The endpoint is small on purpose and must never let a client starve a
//! scrape or stall the UDP path:
//! - it runs on its own thread; the workers only copy their counters into a
//!   mutex-guarded slot now and then, off the packet path;
//! - every socket is nonblocking;
//! - at most [`MAX_CONNS`] connections; when full, a new connection evicts
//!   one that has not finished its request, taken from the source address
//!   holding the most connections, oldest first (a slowloris from one
//!   address evicts itself, and a scraper elsewhere is never its victim);
//! - the request head must arrive within [`HEAD_DEADLINE`] (then 408) and fit
//!   in [`MAX_REQUEST`] bytes (then 431);
//! - after the response the write side is shut down and what the client
//!   still sends (a body, the rest of a giant header) is read and thrown away
//!   for up to [`LINGER`] and [`MAX_DRAIN`] bytes before the close, so the
//!   kernel sends FIN rather than a reset that would destroy the response
//!   in flight ("lingering close", as Apache and nginx do).
//!
//! Rendering formats text, allocates and reads `/proc`, which is fine: it
//! happens per scrape, never per packet.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use crate::stats::{Counters, WaitHistogram};

/// Most metrics connections open at once (each holds a [`MAX_REQUEST`] buffer).
pub const MAX_CONNS: usize = 16;
/// Longest request head accepted (request line and headers); more gets 431.
pub const MAX_REQUEST: usize = 8192;
/// The request head must be complete this long after the connection was
/// accepted, or the connection gets 408 and is closed. A scraper sends its
/// request at once; only a slow or idle client waits longer.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// Longest time for a whole connection, response included.
pub const CONN_DEADLINE: Duration = Duration::from_secs(5);
/// After the response, how long the client's leftovers are drained before
/// the close.
pub const LINGER: Duration = Duration::from_secs(1);
/// After the response, at most this many of the client's bytes are drained.
pub const MAX_DRAIN: usize = 1 << 20;

/// A worker whose loop has not turned for this long makes `/healthz` fail
/// (an idle worker turns once a second).
pub const STALLED: Duration = Duration::from_secs(10);

/// First token of the metrics listener; connections follow it. Far above
/// the UDP sockets' tokens.
pub const TOKEN_BASE: usize = 1 << 30;
/// The metrics thread's waker.
const WAKER: Token = Token(TOKEN_BASE - 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the request head.
    Head,
    /// Writing the response.
    Respond,
    /// Response written, write side shut: reading and discarding until EOF.
    Drain,
}

struct Conn {
    stream: TcpStream,
    peer: IpAddr,
    request: Box<[u8]>,
    read: usize,
    response: Vec<u8>,
    written: usize,
    drained: usize,
    phase: Phase,
    accepted: Instant,
    deadline: Instant,
}

/// One worker's share of the traffic, for the `worker` label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Datagrams it received.
    pub received: u64,
    /// Pairs it matched.
    pub matched: u64,
}

/// What the metrics page shows: the workers' latest published counters,
/// summed, taken when a metrics connection is ready.
#[derive(Clone, Debug, Default)]
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
    /// UDP sockets bound and registered with the loop.
    pub udp_sockets: usize,
    /// A shutdown was asked for; the loop is finishing.
    pub stopping: bool,
    /// A worker has not turned its loop yet.
    pub starting: bool,
    /// The worker whose loop has not turned for longest, and for how many
    /// seconds, when that is more than [`STALLED`].
    pub stalled: Option<(usize, f64)>,
    /// Each worker's traffic, in worker order.
    pub workers: Vec<WorkerLoad>,
    /// Cluster mode: members, their liveness, refusals by reason.
    pub cluster: Option<crate::cluster::ClusterStatus>,
}

impl Snapshot {
    /// Why the server is not ready, or `None` when it is: at least one UDP
    /// socket is bound and the loop, which renders this, is turning and not
    /// shutting down.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.udp_sockets == 0 {
            Some("no UDP socket is bound")
        } else if self.stopping {
            Some("shutting down")
        } else if self.starting {
            Some("workers starting")
        } else if self.stalled.is_some() {
            Some("a worker is stalled")
        } else {
            None
        }
    }
}

/// The metrics endpoint on its own thread: a `mio` loop over the listener
/// and its connections, which renders from the snapshot its caller builds.
pub struct MetricsServer {
    poll: Poll,
    metrics: Metrics,
    waker: Arc<Waker>,
}

impl MetricsServer {
    /// Binds `addr` (the thread starts with [`MetricsServer::run`]).
    pub fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        let poll = Poll::new()?;
        let metrics = Metrics::bind(addr, poll.registry())?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(MetricsServer {
            poll,
            metrics,
            waker,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.metrics.local_addr()
    }

    /// Wakes [`MetricsServer::run`] so that it sees its `exit` flag.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Serves until `exit` is set (and the waker woken), rendering from
    /// `snapshot()` whenever a request is complete.
    pub fn run(
        mut self,
        mut snapshot: impl FnMut() -> Snapshot,
        exit: &AtomicBool,
    ) -> io::Result<()> {
        let mut events = Events::with_capacity(64);
        let mut deadline: Option<Instant> = None;
        while !exit.load(Ordering::Acquire) {
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                let token = event.token();
                if Metrics::owns(token) {
                    self.metrics
                        .ready(self.poll.registry(), token, Instant::now(), &mut snapshot);
                }
            }
            // A new connection brings a deadline the poll must wake for.
            deadline = self.metrics.expire(self.poll.registry(), Instant::now());
        }
        Ok(())
    }
}

/// The metrics listener and its connections.
pub struct Metrics {
    listener: TcpListener,
    conns: Slab<Conn>,
    local: SocketAddr,
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

    /// Handles readiness of `token`: accepts, reads, answers, drains, closes.
    /// `snapshot` is called when a request is complete and its answer needs
    /// the server's state.
    pub fn ready(
        &mut self,
        registry: &Registry,
        token: Token,
        now: Instant,
        snapshot: &mut dyn FnMut() -> Snapshot,
    ) {
        if token.0 == TOKEN_BASE {
            self.accept(registry, now);
            return;
        }
        let key = token.0 - TOKEN_BASE - 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // An I/O error ends the connection like a finished one.
        if drive(conn, snapshot, now).unwrap_or(true) {
            self.close(registry, key);
        }
    }

    fn accept(&mut self, registry: &Registry, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= MAX_CONNS {
                        match self.victim() {
                            Some(key) => self.close(registry, key),
                            // Everyone is mid-response: this one waits no
                            // queue, it is closed before reading anything.
                            None => {
                                drop(stream);
                                continue;
                            }
                        }
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
                        peer: peer.ip(),
                        request: vec![0; MAX_REQUEST].into_boxed_slice(),
                        read: 0,
                        response: Vec::new(),
                        written: 0,
                        drained: 0,
                        phase: Phase::Head,
                        accepted: now,
                        deadline: now + HEAD_DEADLINE,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ECONNABORTED and friends: that connection is gone; go on.
                Err(_) => return,
            }
        }
    }

    /// The connection to give up for a new one: a draining one (its response
    /// is out) if any; else one still reading its head, from the address
    /// with the most connections, oldest first. `None` when every
    /// connection is writing its response.
    fn victim(&self) -> Option<usize> {
        if let Some((key, _)) = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Drain)
            .min_by_key(|(_, c)| c.accepted)
        {
            return Some(key);
        }
        let held = |ip: IpAddr| self.conns.iter().filter(|(_, c)| c.peer == ip).count();
        self.conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Head)
            .map(|(key, c)| (std::cmp::Reverse(held(c.peer)), c.accepted, key))
            .min()
            .map(|(_, _, key)| key)
    }

    fn close(&mut self, registry: &Registry, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }

    /// The earliest deadline of the open connections.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, c)| c.deadline).min()
    }

    /// Handles connections past their deadline: one still without a complete
    /// request gets 408, a draining one is closed. Returns the next deadline.
    pub fn expire(&mut self, registry: &Registry, now: Instant) -> Option<Instant> {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            let done = match self.conns.get_mut(key) {
                Some(conn) if conn.phase == Phase::Head => {
                    conn.response = response(408, "Request Timeout", "request head too slow\n");
                    conn.phase = Phase::Respond;
                    conn.deadline = now + LINGER;
                    respond(conn, now).unwrap_or(true)
                }
                _ => true,
            };
            if done {
                self.close(registry, key);
            }
        }
        self.next_deadline()
    }
}

/// Moves a connection along: read the head, write the response, drain.
/// Ok(true) when the connection is finished and can be closed.
fn drive(
    conn: &mut Conn,
    snapshot: &mut dyn FnMut() -> Snapshot,
    now: Instant,
) -> io::Result<bool> {
    if conn.phase == Phase::Head {
        loop {
            if conn.read == conn.request.len() {
                conn.response = response(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large\n",
                );
                break;
            }
            match conn.stream.read(&mut conn.request[conn.read..]) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    conn.read += n;
                    if let Some(head) = complete_head(&conn.request[..conn.read]) {
                        conn.response = answer(head, &snapshot());
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        conn.phase = Phase::Respond;
        conn.deadline = conn.accepted + CONN_DEADLINE;
    }
    respond(conn, now)
}

/// Writes the rest of the response, then drains. Ok(true) when finished.
fn respond(conn: &mut Conn, now: Instant) -> io::Result<bool> {
    if conn.phase == Phase::Respond {
        while conn.written < conn.response.len() {
            match conn.stream.write(&conn.response[conn.written..]) {
                Ok(0) => return Ok(true),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // FIN after the response; what the client still sends is read and
        // dropped below, so the final close does not turn into a reset.
        conn.stream.shutdown(Shutdown::Write)?;
        conn.phase = Phase::Drain;
        conn.deadline = now + LINGER;
        conn.response = Vec::new();
    }
    let mut sink = [0u8; 4096];
    loop {
        if conn.drained >= MAX_DRAIN {
            return Ok(true);
        }
        match conn.stream.read(&mut sink) {
            Ok(0) => return Ok(true),
            Ok(n) => conn.drained += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
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
    let head_only = method == Some(b"HEAD");
    if !valid {
        return response(400, "Bad Request", "malformed request line\n");
    }
    if !matches!(method, Some(b"GET" | b"HEAD")) {
        return response(405, "Method Not Allowed", "only GET and HEAD are served\n");
    }
    // The query string, if any, is ignored.
    let path = path.unwrap_or_default();
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let mut out = match path {
        b"/metrics" => {
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
        b"/healthz" => match snapshot.stalled {
            None => response(200, "OK", "ok\n"),
            Some((worker, secs)) => response(
                503,
                "Service Unavailable",
                &format!("worker {worker} has not turned its loop for {secs:.0} s\n"),
            ),
        },
        b"/readyz" => match snapshot.not_ready() {
            None => response(200, "OK", "ready\n"),
            Some(why) => response(503, "Service Unavailable", &format!("not ready: {why}\n")),
        },
        _ => response(404, "Not Found", "try /metrics, /healthz or /readyz\n"),
    };
    if head_only {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            out.truncate(end + 4);
        }
    }
    out
}

fn response(code: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Counters that are gauges (a level now, not a total), exported without `_total`.
const GAUGES: &[&str] = &["pending", "remembered"];

/// Counters that count datagrams dropped without a reply, exported as
/// `psync_dropped_total{reason="NAME"}`.
pub const DROP_REASONS: &[&str] = &[
    "bad_size",
    "self_pair",
    "bad_family",
    "bad_source",
    "table_full",
    "rate_limited",
    "per_ip_limit",
    "per_prefix_limit",
    "stun_refused",
    "seed_refused",
    "v2_malformed",
    "v2_bad_source",
    "auth_failed_unknown_key",
    "auth_failed_expired",
    "auth_failed_bad_mac",
];

/// HELP text of the counters known when this was written; a counter added
/// later is exported all the same, with a HELP line pointing to the docs.
fn help(name: &str) -> &'static str {
    match name {
        "received" => "Datagrams received.",
        "registered" => "New pending registrations.",
        "refreshed" => "Pending registrations refreshed by a repeated request.",
        "matched" => "Pairs matched.",
        "replayed" => "Replies resent to retransmitted requests after a match.",
        "expired" => "Pending registrations that expired unmatched.",
        "replay_full" => "Matches whose replay was cut short to make room for a new registration.",
        "evicted" => {
            "Pending registrations that gave their slot to a registration from a lighter source."
        }
        "kernel_drops" => {
            "Datagrams the kernel dropped because a socket's receive buffer was full."
        }
        "remembered" => "Matched pairs remembered for replay now.",
        "sent" => "Replies handed to the kernel.",
        "send_errors" => "Replies the kernel refused with a hard error.",
        "send_dropped" => "Replies dropped because the send queue was full.",
        "recv_errors" => "Receive calls that failed unexpectedly.",
        "pending" => "Pending registrations held now.",
        "stun_answered" => "STUN Binding requests answered.",
        "v2_admitted" => "Protocol v2 requests with a valid token, handed to the engine.",
        "cookie_sent" => "Cookie replies sent to v2 requests from sources over their rate.",
        "cookie_validated" => {
            "v2 requests from sources over their rate let through by a valid cookie."
        }
        "forwarded_out" => "Cluster: requests forwarded to the member that owns their pair.",
        "forwarded_in" => "Cluster: requests other members forwarded here.",
        "forward_rejected" => "Cluster: datagrams from the cluster socket refused.",
        _ => "A psync counter; see the counters table in docs/operations.md.",
    }
}

/// Renders the Prometheus text format: every field of
/// [`Counters::fields`], the server's gauges and histogram,
/// `psync_build_info`, and the process metrics.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(8192);
    let fields = s.counters.fields();
    for (name, value) in fields.iter() {
        if DROP_REASONS.contains(name) {
            continue;
        }
        if GAUGES.contains(name) {
            metric(&mut out, name, "gauge", help(name), *value as f64);
        } else {
            let total = format!("{name}_total");
            metric(&mut out, &total, "counter", help(name), *value as f64);
        }
    }
    let _ = write!(
        out,
        "# HELP psync_dropped_total Datagrams dropped without a reply, by reason.\n\
         # TYPE psync_dropped_total counter\n"
    );
    for (name, value) in fields.iter() {
        if DROP_REASONS.contains(name) {
            let _ = writeln!(out, "psync_dropped_total{{reason=\"{name}\"}} {value}");
        }
    }
    metric(
        &mut out,
        "capacity",
        "gauge",
        "Most pending registrations held at once.",
        s.capacity as f64,
    );
    metric(
        &mut out,
        "replay_entries",
        "gauge",
        "Matched requests remembered for replay.",
        s.replay_entries as f64,
    );
    metric(
        &mut out,
        "uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        s.uptime,
    );
    metric(
        &mut out,
        "ready",
        "gauge",
        "1 when /readyz answers 200: UDP sockets bound, every worker's loop turning, not shutting down.",
        if s.not_ready().is_none() { 1.0 } else { 0.0 },
    );
    metric(
        &mut out,
        "workers",
        "gauge",
        "Worker threads serving UDP (--workers).",
        s.workers.len() as f64,
    );
    let _ = write!(
        out,
        "# HELP psync_worker_received_total Datagrams received, per worker (the balance of --workers).\n\
         # TYPE psync_worker_received_total counter\n"
    );
    for (k, w) in s.workers.iter().enumerate() {
        let _ = writeln!(
            out,
            "psync_worker_received_total{{worker=\"{k}\"}} {}",
            w.received
        );
    }
    let _ = write!(
        out,
        "# HELP psync_worker_matched_total Pairs matched, per worker.\n\
         # TYPE psync_worker_matched_total counter\n"
    );
    for (k, w) in s.workers.iter().enumerate() {
        let _ = writeln!(
            out,
            "psync_worker_matched_total{{worker=\"{k}\"}} {}",
            w.matched
        );
    }
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
    let _ = write!(
        out,
        "# HELP psync_build_info The running build: version, git commit, enabled features.\n\
         # TYPE psync_build_info gauge\n\
         psync_build_info{{version=\"{}\",commit=\"{}\",features=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        crate::cli::COMMIT,
        crate::cli::FEATURES,
    );
    if let Some(c) = &s.cluster {
        render_cluster(&mut out, c);
    }
    process::render(&mut out);
    out
}

/// Cluster mode: live members, each member's liveness and heartbeat age,
/// and the cluster datagrams refused, by reason.
fn render_cluster(out: &mut String, c: &crate::cluster::ClusterStatus) {
    metric(
        out,
        "cluster_members_live",
        "gauge",
        "Cluster members that own pairs now (this one included when it does).",
        c.live as f64,
    );
    let _ = write!(
        out,
        "# HELP psync_cluster_member_live 1 when the member owns pairs now (its heartbeats arrive).
         # TYPE psync_cluster_member_live gauge
"
    );
    for m in &c.members {
        let _ = writeln!(
            out,
            "psync_cluster_member_live{{member=\"{}\"}} {}",
            m.addr,
            u8::from(m.live)
        );
    }
    let _ = write!(
        out,
        "# HELP psync_cluster_member_heartbeat_age_seconds Seconds since the member's last authenticated datagram (absent: never heard).
         # TYPE psync_cluster_member_heartbeat_age_seconds gauge
"
    );
    for m in &c.members {
        if let Some(ms) = m.heard_ms_ago {
            let _ = writeln!(
                out,
                "psync_cluster_member_heartbeat_age_seconds{{member=\"{}\"}} {}",
                m.addr,
                ms as f64 / 1000.0
            );
        }
    }
    let _ = write!(
        out,
        "# HELP psync_cluster_rejected_total Cluster datagrams refused, by reason.
         # TYPE psync_cluster_rejected_total counter
"
    );
    for (reason, n) in c.counters.rejected_by_reason() {
        let _ = writeln!(
            out,
            "psync_cluster_rejected_total{{reason=\"{reason}\"}} {n}"
        );
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = write!(
        out,
        "# HELP psync_{name} {help}\n# TYPE psync_{name} {kind}\npsync_{name} {value}\n"
    );
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape time
/// (the names and meanings of Prometheus' client libraries). Where `/proc`
/// is missing (not Linux) they are left out.
mod process {
    use std::fmt::Write as _;

    /// Clock ticks per second of `/proc/*/stat` times: USER_HZ, which the
    /// kernel fixes at 100 for user space on every architecture psync runs
    /// on (the Prometheus Go client's procfs assumes the same).
    const USER_HZ: f64 = 100.0;

    pub(super) fn render(out: &mut String) {
        let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        if let Some((cpu, start_ticks)) = stat() {
            gauge(
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                cpu,
            );
            if let Some(boot) = boot_time() {
                gauge(
                    "process_start_time_seconds",
                    "gauge",
                    "Start time of the process since unix epoch in seconds.",
                    boot + start_ticks / USER_HZ,
                );
            }
        }
        if let Some((rss, vsize)) = memory() {
            gauge(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss,
            );
            gauge(
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vsize,
            );
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory being listed holds one descriptor itself.
            let open = dir.count().saturating_sub(1);
            gauge(
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                open as f64,
            );
        }
        if let Some(max) = max_fds() {
            gauge(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                max,
            );
        }
    }

    /// (utime + stime in seconds, start time in ticks after boot).
    fn stat() -> Option<(f64, f64)> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields are numbered from 1; `rest` starts at field 3 (state).
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        Some(((field(14)? + field(15)?) / USER_HZ, field(22)?))
    }

    fn boot_time() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }

    /// (VmRSS, VmSize) in bytes.
    fn memory() -> Option<(f64, f64)> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib = |key: &str| -> Option<f64> {
            let line = text.lines().find_map(|l| l.strip_prefix(key))?;
            let n: f64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(n * 1024.0)
        };
        Some((kib("VmRSS:")?, kib("VmSize:")?))
    }

    fn max_fds() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_rendered() {
        let s = Snapshot {
            udp_sockets: 1,
            ..Snapshot::default()
        };
        let page = render(&s);
        for (name, _) in s.counters.fields() {
            let series = if DROP_REASONS.contains(&name) {
                format!("psync_dropped_total{{reason=\"{name}\"}} ")
            } else if GAUGES.contains(&name) {
                format!("psync_{name} ")
            } else {
                format!("psync_{name}_total ")
            };
            assert!(page.contains(&series), "{series} missing:\n{page}");
        }
        assert!(page.contains("psync_build_info{version=\""));
        assert!(page.contains("psync_ready 1\n"));
    }

    /// Every counter has a row in the operator's table (docs/operations.md),
    /// so a counter added to `Counters::fields` cannot go undocumented.
    #[test]
    fn every_counter_is_documented() {
        let doc = include_str!("../docs/operations.md");
        for (name, _) in Counters::default().fields() {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "counter {name} has no row in docs/operations.md's Counters table"
            );
        }
    }

    #[test]
    fn health_paths() {
        let mut s = Snapshot {
            udp_sockets: 1,
            ..Snapshot::default()
        };
        let status = |s: &Snapshot, req: &[u8]| {
            let out = answer(req, s);
            String::from_utf8(out).unwrap()
        };
        assert!(status(&s, b"GET /healthz HTTP/1.1").starts_with("HTTP/1.1 200"));
        assert!(status(&s, b"GET /readyz HTTP/1.1").starts_with("HTTP/1.1 200"));
        assert!(status(&s, b"GET /metrics?x=1 HTTP/1.1").starts_with("HTTP/1.1 200"));
        let head = status(&s, b"HEAD /metrics HTTP/1.1");
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"));
        s.stopping = true;
        let not = status(&s, b"GET /readyz HTTP/1.1");
        assert!(not.starts_with("HTTP/1.1 503") && not.contains("shutting down"));
        assert!(status(&s, b"POST /metrics HTTP/1.1").starts_with("HTTP/1.1 405"));
        assert!(status(&s, b"GET /nope HTTP/1.1").starts_with("HTTP/1.1 404"));
    }
}
