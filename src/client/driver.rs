//! The mio driver: owns the sockets and the clock, and moves bytes between
//! them and the [`Connector`]. No decisions are made here.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mio::net::UdpSocket as MioSocket;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::config::ClientConfig;
use super::connector::{Action, Connector, Finished, MapSummary};
use super::error::io_err;
use super::portmap::{self, Lease};
use super::punch::{Command, SocketId, Transmit};
use super::report::ConnectReport;
use super::session::{Connection, Session};
use super::ClientError;

/// Receive buffer: larger than anything valid, so an oversized datagram is
/// seen at its true length instead of silently truncated.
const RECV_BUF: usize = 2048;
/// Longest sleep when the connector names no deadline (it always should).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A failed connect with what was learned on the way.
#[derive(Debug)]
pub struct Failure {
    /// Why.
    pub error: ClientError,
    /// The NAT classification, mapping and strategies tried.
    pub report: Box<ConnectReport>,
}

/// The sockets of the current attempt, by [`SocketId`].
#[derive(Default)]
struct Sockets {
    main: Option<MioSocket>,
    seed: Option<MioSocket>,
    birthday: Vec<Option<MioSocket>>,
}

impl Sockets {
    fn get(&self, id: SocketId) -> Option<&MioSocket> {
        match id {
            SocketId::Main => self.main.as_ref(),
            SocketId::Seed => self.seed.as_ref(),
            SocketId::Birthday(i) => self.birthday.get(usize::from(i))?.as_ref(),
        }
    }

    fn take(&mut self, id: SocketId) -> Option<MioSocket> {
        match id {
            SocketId::Main => self.main.take(),
            SocketId::Seed => self.seed.take(),
            SocketId::Birthday(i) => self.birthday.get_mut(usize::from(i))?.take(),
        }
    }

    fn clear(&mut self, poll: &Poll) {
        let all = [self.main.take(), self.seed.take()]
            .into_iter()
            .chain(self.birthday.drain(..));
        for mut s in all.flatten() {
            let _ = poll.registry().deregister(&mut s);
        }
    }
}

fn token(id: SocketId) -> Token {
    Token(match id {
        SocketId::Main => 0,
        SocketId::Seed => 1,
        SocketId::Birthday(i) => 2 + usize::from(i),
    })
}

fn socket_id(t: Token) -> SocketId {
    match t.0 {
        0 => SocketId::Main,
        1 => SocketId::Seed,
        n => SocketId::Birthday((n - 2) as u16),
    }
}

/// Runs `cfg`'s connect to the end.
pub(super) fn run(cfg: &ClientConfig) -> Result<Connection, Failure> {
    let fail = |error, report| Failure {
        error,
        report: Box::new(report),
    };
    let seed = getrandom::u64().map_err(|e| {
        fail(
            ClientError::Io {
                context: "cannot draw a random seed".into(),
                source: io::Error::other(e.to_string()),
            },
            ConnectReport::default(),
        )
    })?;
    let mut c = Connector::new(cfg.clone(), Instant::now(), seed);
    let mut poll = Poll::new()
        .map_err(io_err("cannot create a poll instance"))
        .map_err(|e| fail(e, ConnectReport::default()))?;
    let mut sockets = Sockets::default();
    let mut lease: Option<Lease> = None;
    let mut events = Events::with_capacity(64);
    let mut buf = [0u8; RECV_BUF];
    loop {
        while let Some(action) = c.poll_action() {
            act(&mut c, action, cfg, &poll, &mut sockets, &mut lease);
        }
        let now = Instant::now();
        while let Some(t) = c.poll_transmit(now) {
            send(&mut c, &sockets, &t);
        }
        if let Some(result) = c.result() {
            let report = c.report().clone();
            return match result {
                Ok(f) => connection(
                    f,
                    cfg,
                    c.epoch(),
                    &poll,
                    &mut sockets,
                    lease,
                    report.clone(),
                )
                .map_err(|e| fail(e, report)),
                Err(e) => Err(fail(e, report)),
            };
        }
        let timeout = c
            .poll_timeout()
            .map_or(IDLE_WAIT, |t| t.saturating_duration_since(now));
        if let Err(e) = wait(&mut poll, &mut events, timeout) {
            return Err(fail(e, c.report().clone()));
        }
        'events: for event in events.iter() {
            let id = socket_id(event.token());
            let Some(s) = sockets.get(id) else { continue };
            // Edge-triggered: drain until WouldBlock. An error (ICMP port
            // unreachable and the like) is consumed by the read; keep reading.
            // Once the connect is over, what is left belongs to the session.
            loop {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        c.handle(Instant::now(), id, from, &buf[..n]);
                        if c.is_over() {
                            break 'events;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("receive on {id:?}: {e}");
                        c.recv_error(Instant::now(), id, &e);
                        if c.is_over() {
                            break 'events;
                        }
                    }
                }
            }
        }
        c.handle_timeout(Instant::now());
    }
}

/// Does what the connector asked.
fn act(
    c: &mut Connector,
    action: Action,
    cfg: &ClientConfig,
    poll: &Poll,
    sockets: &mut Sockets,
    lease: &mut Option<Lease>,
) {
    match action {
        Action::NewAttempt => {
            sockets.clear(poll);
            *lease = None;
            if cfg.token.is_some() {
                c.host_ip(route_source(cfg.server));
            }
            let opened = open(poll, cfg.server, 0, SocketId::Main)
                .map_err(io_err("cannot open the registration socket"))
                .and_then(|s| {
                    let local = s
                        .local_addr()
                        .map_err(io_err("cannot read the local address"))?;
                    sockets.main = Some(s);
                    Ok(local)
                });
            c.main_socket_opened(Instant::now(), opened);
        }
        Action::Punch(Command::BindSeed { port }) => {
            let r = open(poll, cfg.server, port, SocketId::Seed).map(|s| sockets.seed = Some(s));
            c.socket_opened(Instant::now(), SocketId::Seed, r.map_err(|e| e.to_string()));
        }
        Action::Punch(Command::OpenBirthday { count }) => {
            for i in 0..count {
                let id = SocketId::Birthday(i);
                let r = open(poll, cfg.server, 0, id).map(|s| {
                    let k = usize::from(i);
                    if sockets.birthday.len() <= k {
                        sockets.birthday.resize_with(k + 1, || None);
                    }
                    sockets.birthday[k] = Some(s);
                });
                let failed = r.is_err();
                c.socket_opened(Instant::now(), id, r.map_err(|e| e.to_string()));
                if failed {
                    // Out of descriptors or ports: the rest would fail too.
                    break;
                }
            }
        }
        Action::IcmpErrors(on) => {
            if let Some(s) = sockets.main.as_ref() {
                // Turning it off also drops the reports queued meanwhile.
                if let Err(e) = crate::sys::set_recv_errors(s, cfg.server.is_ipv6(), on) {
                    log::debug!("cannot set ICMP error reports on the main socket: {e}");
                }
            }
        }
        Action::MapPort(req) => {
            let out = portmap::map(&req);
            for (p, what) in &out.tried {
                log::info!("port mapping: {p}: {what} ({} ms)", out.elapsed.as_millis());
            }
            let summary = MapSummary {
                mapped: out.lease.as_ref().map(|l| l.external),
                tried: out
                    .tried
                    .iter()
                    .map(|(p, w)| (p.name().to_string(), w.clone()))
                    .collect(),
            };
            *lease = out.lease;
            c.port_mapped(Instant::now(), summary);
        }
    }
}

/// Sends one datagram; a low TTL for openers, restored afterwards.
fn send(c: &mut Connector, sockets: &Sockets, t: &Transmit) {
    let Some(s) = sockets.get(t.socket) else {
        return;
    };
    let result = match t.ttl {
        None => s.send_to(t.data(), t.to),
        Some(ttl) => send_with_ttl(s, t.data(), t.to, ttl),
    };
    match result {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => {
            log::debug!("send from {:?} to {} failed: {e}", t.socket, t.to);
            c.send_failed(t.socket, &e);
        }
    }
}

fn send_with_ttl(socket: &MioSocket, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<usize> {
    let sock = SockRef::from(socket);
    if to.is_ipv4() {
        let old = sock.ttl_v4()?;
        sock.set_ttl_v4(u32::from(ttl))?;
        let sent = socket.send_to(data, to);
        sock.set_ttl_v4(old)?;
        sent
    } else {
        let old = sock.unicast_hops_v6()?;
        sock.set_unicast_hops_v6(u32::from(ttl))?;
        let sent = socket.send_to(data, to);
        sock.set_unicast_hops_v6(old)?;
        sent
    }
}

/// The local IP the kernel would send from toward `to` (no datagram is
/// sent: connecting a UDP socket only picks the route), or `None`.
fn route_source(to: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// A nonblocking UDP socket of `like`'s family on the wildcard address at
/// `port`, registered with `poll` under `id`'s token.
fn open(poll: &Poll, like: SocketAddr, port: u16, id: SocketId) -> io::Result<MioSocket> {
    let (domain, local): (Domain, SocketAddr) = match like {
        SocketAddr::V4(_) => (Domain::IPV4, (Ipv4Addr::UNSPECIFIED, port).into()),
        SocketAddr::V6(_) => (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into()),
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if like.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&SockAddr::from(local))?;
    socket.set_nonblocking(true)?;
    let mut s = MioSocket::from_std(socket.into());
    poll.registry()
        .register(&mut s, token(id), Interest::READABLE)?;
    Ok(s)
}

/// Waits for readiness or `timeout`, retrying on `EINTR`.
fn wait(poll: &mut Poll, events: &mut Events, timeout: Duration) -> Result<(), ClientError> {
    loop {
        match poll.poll(events, Some(timeout)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("poll failed")(e)),
        }
    }
}

/// Turns the winning socket into a connected, blocking [`Connection`].
fn connection(
    f: Finished,
    cfg: &ClientConfig,
    epoch: Instant,
    poll: &Poll,
    sockets: &mut Sockets,
    lease: Option<Lease>,
    report: ConnectReport,
) -> Result<Connection, ClientError> {
    let mut s = sockets
        .take(f.proven.socket)
        .ok_or_else(|| io_err("the winning socket is gone")(io::Error::other("internal")))?;
    let _ = poll.registry().deregister(&mut s);
    sockets.clear(poll);
    let socket: UdpSocket = s.into();
    socket
        .set_nonblocking(false)
        .map_err(io_err("cannot make the socket blocking"))?;
    // Connected: the kernel now filters out everyone but the partner, and the
    // local address shows the real source IP.
    let target = f.proven.target;
    socket
        .connect(target)
        .map_err(io_err(format!("cannot connect the socket to {target}")))?;
    let local = socket
        .local_addr()
        .map_err(io_err("cannot read the local address"))?;
    Ok(Connection {
        socket,
        session: Session {
            self_id: cfg.self_id,
            peer_id: cfg.peer_id,
            nonce: f.nonce,
            epoch,
        },
        peer_nonce: f.proven.peer_nonce,
        decider: f.decider,
        strategy: f.proven.strategy,
        local,
        peer: target,
        peer_public: f.reply.peer,
        src_port: f.reply.src_port,
        dst_port: f.reply.dst_port,
        rtt: f.proven.rtt,
        elapsed: epoch.elapsed(),
        attempts: f.attempts,
        report,
        // The mapping points at the main socket; keep it only if that is
        // the socket the session uses.
        lease: lease.filter(|_| f.proven.socket == SocketId::Main),
    })
}
