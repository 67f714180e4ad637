//! The pipe session over a proven path: [`Connection`], its `send`/`recv`,
//! and [`Connection::pipe`], netcat-style relaying with keepalives and a
//! clean `bye`. This is the I/O side of a connection (blocking socket, the
//! clock); the handshake's bytes come from [`crate::wire::peer`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{Strategy, MAX_DATAGRAM, MAX_PAYLOAD};
use super::error::io_err;
use super::portmap::Lease;
use super::report::ConnectReport;
use super::ClientError;
use crate::wire::peer::{Header, Kind, HEADER_LEN};
use crate::wire::PeerId;

/// Receive buffer: larger than anything valid, so an oversized datagram is
/// seen at its true length instead of silently truncated.
const RECV_BUF: usize = 2048;
/// Resend period of `bye` until it is acknowledged.
const BYE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest single wait in the pipe loop, so a local EOF is noticed promptly.
const PIPE_TICK: Duration = Duration::from_millis(100);

/// What one side needs to build and check session headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Session {
    pub(crate) self_id: PeerId,
    pub(crate) peer_id: PeerId,
    pub(crate) nonce: u64,
    pub(crate) epoch: Instant,
}

impl Session {
    fn header(&self, kind: Kind, echo: u64, echo_stamp: u32) -> [u8; HEADER_LEN] {
        Header {
            kind,
            from: self.self_id,
            to: self.peer_id,
            nonce: self.nonce,
            echo,
            // Microseconds, wrapping every 71 minutes: RTTs are differences.
            stamp: self.epoch.elapsed().as_micros() as u32,
            echo_stamp,
        }
        .to_bytes()
    }

    /// The header of a datagram from the partner to us, or `None`.
    fn accept<'a>(&self, datagram: &'a [u8]) -> Option<(Header, &'a [u8])> {
        let (h, payload) = Header::parse(datagram).ok()?;
        (h.from == self.peer_id && h.to == self.self_id).then_some((h, payload))
    }
}

/// A proven path to the partner.
#[derive(Debug)]
pub struct Connection {
    pub(crate) socket: UdpSocket,
    pub(crate) session: Session,
    pub(crate) peer_nonce: u64,
    pub(crate) decider: bool,
    /// The strategy that won.
    pub strategy: Strategy,
    /// Our local address (the socket is connected to the partner).
    pub local: SocketAddr,
    /// The partner address that answered.
    pub peer: SocketAddr,
    /// The partner's public address as the server saw it.
    pub peer_public: SocketAddr,
    /// The source port the server chose for us.
    pub src_port: u16,
    /// The destination port the server chose for us.
    pub dst_port: u16,
    /// Round trip of the first answered probe on the winning path, if measured.
    pub rtt: Option<Duration>,
    /// Time from the start of [`connect`](super::connect) to the proven path.
    pub elapsed: Duration,
    /// Registrations made (1 unless the first punch failed).
    pub attempts: u32,
    /// What was learned and tried on the way (NAT, strategies, mapping).
    pub report: ConnectReport,
    /// The router port mapping, held for the session and deleted on drop.
    pub(crate) lease: Option<Lease>,
}

/// How [`Connection::pipe`] keeps the session alive and decides it is over.
#[derive(Clone, Copy, Debug)]
pub struct PipeConfig {
    /// Keepalive period: Linux conntrack forgets an unanswered UDP flow after
    /// 30 s, and many home routers sooner.
    pub keepalive: Duration,
    /// The session ends when nothing has come from the partner this long.
    pub silence: Duration,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            keepalive: Duration::from_secs(5),
            silence: Duration::from_secs(20),
        }
    }
}

/// Byte counts of a finished pipe session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// Payload bytes sent.
    pub sent: u64,
    /// Payload bytes received and written.
    pub received: u64,
}

impl Connection {
    /// The router port mapping this session holds (deleted when the
    /// connection is dropped), if one was granted for its socket.
    pub fn mapping(&self) -> Option<SocketAddr> {
        self.lease.as_ref().map(|l| l.external)
    }

    /// The connected socket, for callers that run their own protocol over it.
    /// Datagrams from the partner still carry the psync header.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Sends one payload (at most [`MAX_PAYLOAD`] bytes) to the partner.
    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len()),
            ));
        }
        let mut buf = [0u8; MAX_DATAGRAM];
        buf[..HEADER_LEN].copy_from_slice(&self.session.header(Kind::Data, self.peer_nonce, 0));
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        self.socket
            .send(&buf[..HEADER_LEN + payload.len()])
            .map(|_| ())
    }

    /// Waits up to `timeout` for the next payload from the partner, copies it
    /// to the front of `buf` (truncating) and returns its length; `None` on
    /// timeout. Handshake stragglers are answered, keepalives skipped.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let until = Instant::now() + timeout;
        let mut dgram = [0u8; RECV_BUF];
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(until - now))?;
            let n = match self.socket.recv(&mut dgram) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if let Some((Kind::Data, payload)) = self.handle(&dgram[..n]) {
                let len = payload.len().min(buf.len());
                buf[..len].copy_from_slice(&payload[..len]);
                return Ok(Some(len));
            }
        }
    }

    /// Checks a datagram from the partner and answers handshake stragglers.
    /// Returns its kind and payload if it is valid.
    fn handle<'a>(&self, datagram: &'a [u8]) -> Option<(Kind, &'a [u8])> {
        let (h, payload) = self.session.accept(datagram)?;
        if h.nonce != self.peer_nonce {
            return None;
        }
        match h.kind {
            // The partner is still punching: it has not seen our answer, or,
            // if we decided, not our done (all of them lost); send both.
            Kind::Probe => {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Reply, h.nonce, h.stamp));
                if self.decider {
                    let _ = self
                        .socket
                        .send(&self.session.header(Kind::Done, h.nonce, h.stamp));
                }
            }
            // Our echo of done was lost; only the side that did not decide
            // echoes, so the two never ping-pong.
            Kind::Done if !self.decider => {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Done, h.nonce, h.stamp));
            }
            _ => {}
        }
        Some((h.kind, payload))
    }

    /// Relays `input` to the partner and the partner's payloads to `output`,
    /// netcat-style, with keepalives, until both sides have reached EOF, or
    /// the partner goes silent. Datagram boundaries follow `input`'s reads;
    /// like UDP netcat, a lost datagram is lost.
    ///
    /// `input` is read on its own thread; if the session ends first, that
    /// thread stays blocked in `read` until the input yields or the process ends.
    pub fn pipe<R, W>(
        self,
        mut input: R,
        mut output: W,
        cfg: &PipeConfig,
    ) -> Result<PipeStats, ClientError>
    where
        R: Read + Send + 'static,
        W: Write,
    {
        let sender = self
            .socket
            .try_clone()
            .map_err(io_err("cannot clone the socket"))?;
        let eof = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (reader_eof, reader_sent) = (eof.clone(), sent.clone());
        let session = self.session;
        let peer_nonce = self.peer_nonce;
        std::thread::spawn(move || {
            let mut buf = [0u8; MAX_DATAGRAM];
            loop {
                match input.read(&mut buf[HEADER_LEN..]) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf[..HEADER_LEN].copy_from_slice(&session.header(
                            Kind::Data,
                            peer_nonce,
                            0,
                        ));
                        if sender.send(&buf[..HEADER_LEN + n]).is_ok() {
                            reader_sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("input read failed, treating it as EOF: {e}");
                        break;
                    }
                }
            }
            reader_eof.store(true, Ordering::Release);
            let _ = sender.send(&session.header(Kind::Bye, peer_nonce, 0));
        });

        let mut stats = PipeStats::default();
        let mut dgram = [0u8; RECV_BUF];
        let mut last_heard = Instant::now();
        let mut next_keepalive = Instant::now() + cfg.keepalive;
        let mut next_bye = Instant::now() + BYE_INTERVAL;
        let (mut peer_bye, mut bye_acked) = (false, false);
        loop {
            let now = Instant::now();
            let local_eof = eof.load(Ordering::Acquire);
            if local_eof && bye_acked && peer_bye {
                stats.sent = sent.load(Ordering::Relaxed);
                return Ok(stats);
            }
            if now.duration_since(last_heard) >= cfg.silence {
                stats.sent = sent.load(Ordering::Relaxed);
                // A partner that said bye and then left owes us nothing.
                return if peer_bye {
                    Ok(stats)
                } else {
                    Err(ClientError::PeerSilent {
                        peer: self.peer,
                        silence: cfg.silence,
                    })
                };
            }
            if local_eof && !bye_acked && now >= next_bye {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Bye, self.peer_nonce, 0));
                next_bye = now + BYE_INTERVAL;
            }
            if now >= next_keepalive {
                let _ = self
                    .socket
                    .send(&self.session.header(Kind::Keepalive, self.peer_nonce, 0));
                next_keepalive = now + cfg.keepalive;
            }
            let wake = next_keepalive
                .min(last_heard + cfg.silence)
                .min(now + PIPE_TICK)
                .max(now + Duration::from_millis(1));
            self.socket
                .set_read_timeout(Some(wake - now))
                .map_err(io_err("cannot set a read timeout"))?;
            let n = match self.socket.recv(&mut dgram) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                // The partner's socket is closed (ICMP port unreachable): the
                // silence timer decides.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(io_err("receive from the peer failed")(e)),
            };
            let Some((kind, payload)) = self.handle(&dgram[..n]) else {
                continue;
            };
            last_heard = Instant::now();
            match kind {
                Kind::Data => {
                    output
                        .write_all(payload)
                        .and_then(|()| output.flush())
                        .map_err(io_err("cannot write the output"))?;
                    stats.received += payload.len() as u64;
                }
                Kind::Bye => {
                    peer_bye = true;
                    let _ =
                        self.socket
                            .send(&self.session.header(Kind::ByeAck, self.peer_nonce, 0));
                }
                Kind::ByeAck => bye_acked = true,
                _ => {}
            }
        }
    }

    /// The connection as one JSON object (the CLI's `--json` line): the
    /// path, and the report of how it was found (see `docs/client.md`).
    pub fn to_json(&self) -> String {
        let rtt = match self.rtt {
            Some(d) => format!("{:.3}", d.as_secs_f64() * 1000.0),
            None => "null".into(),
        };
        format!(
            "{{\"ok\":true,\"strategy\":\"{}\",\"local\":\"{}\",\"peer\":\"{}\",\"peer_public\":\"{}\",\"src_port\":{},\"dst_port\":{},\"rtt_ms\":{},\"attempts\":{},\"elapsed_ms\":{},{}}}",
            self.strategy,
            self.local,
            self.peer,
            self.peer_public,
            self.src_port,
            self.dst_port,
            rtt,
            self.attempts,
            self.elapsed.as_millis(),
            self.report.json_fields()
        )
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_accepts_only_the_partner() {
        let probe = Header {
            kind: Kind::Probe,
            from: PeerId::from_u32(1),
            to: PeerId::from_u32(2),
            nonce: 5,
            echo: 0,
            stamp: 0,
            echo_stamp: 0,
        }
        .to_bytes();
        let me = Session {
            self_id: PeerId::from_u32(2),
            peer_id: PeerId::from_u32(1),
            nonce: 9,
            epoch: Instant::now(),
        };
        assert!(me.accept(&probe).is_some());
        let mut other = probe;
        other[8] = 3;
        assert!(me.accept(&other).is_none());
        let mut swapped = probe;
        swapped[8..16].copy_from_slice(&[2, 0, 0, 0, 1, 0, 0, 0]);
        assert!(me.accept(&swapped).is_none());
    }
}
