//! Port mapping: ask the home router to forward a public port to our socket,
//! with PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD (a small client of
//! its own, see `upnp`), so that a peer behind a NAT that changes ports per
//! destination can still be reached at the address the server saw.
//!
//! [`map`] first asks all three at once whether the router speaks them
//! (PCP ANNOUNCE, the NAT-PMP external-address request, an SSDP search),
//! bounded by one short wait, then requests the mapping with the best one
//! that answered: PCP, then NAT-PMP, then UPnP. Only one protocol maps, so a
//! router that speaks several never holds two mappings for one port. A router
//! that speaks none costs the wait at most, and less when it refuses at once
//! (an ICMP "port unreachable" for 5351 ends PCP and NAT-PMP immediately).
//!
//! The mapping is a [`Lease`]; dropping it deletes the mapping (best effort,
//! within a short bound). IPv4 only: routers map IPv6 with firewall pinholes,
//! which psync does not ask for yet.

pub mod natpmp;
pub mod pcp;
mod upnp;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::config::PortMapping;

/// First retransmit interval for PCP and NAT-PMP (RFC 6886 §3.1: 250 ms,
/// doubling).
const RETRANSMIT_START: Duration = Duration::from_millis(250);
/// Bound on the mapping request once the router has answered discovery:
/// a router that answered is there, and adding a rule can take it a while.
const MAP_WAIT: Duration = Duration::from_secs(2);
/// Bound on deleting a mapping at exit.
const RELEASE_WAIT: Duration = Duration::from_millis(300);
/// Description shown in the router's UPnP table.
const DESCRIPTION: &str = "psync";

/// A router protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Port Control Protocol.
    Pcp,
    /// NAT Port Mapping Protocol.
    NatPmp,
    /// UPnP Internet Gateway Device.
    Upnp,
}

impl Protocol {
    /// The name used in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "natpmp",
            Protocol::Upnp => "upnp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to map.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Our socket's local port.
    pub internal_port: u16,
    /// The external port we want: the one the server saw, so that the partner
    /// (who knows only that) reaches us through the mapping.
    pub external_port: u16,
    /// Which protocols, and the wait.
    pub protocols: PortMapping,
    /// Lifetime to ask for.
    pub lifetime: Duration,
    /// Seed for the PCP nonce.
    pub nonce_seed: u64,
}

/// A granted mapping; dropping it deletes the mapping on the router.
pub struct Lease {
    /// Which protocol got it.
    pub protocol: Protocol,
    /// The public address the router forwards to us.
    pub external: SocketAddr,
    /// Our LAN address it forwards to.
    pub internal: SocketAddrV4,
    gateway: Ipv4Addr,
    pcp_nonce: [u8; 12],
    upnp: Option<Box<upnp::Gateway>>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Lease({} {} -> {})",
            self.protocol, self.external, self.internal
        )
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let port = self.internal.port();
        let result = match self.protocol {
            Protocol::Pcp => udp_exchange(
                self.gateway,
                &pcp::map_request(*self.internal.ip(), self.pcp_nonce, port, 0, 0),
                RELEASE_WAIT,
                |b| {
                    pcp::parse_map(b, &self.pcp_nonce).is_ok()
                        || matches!(
                            pcp::parse_map(b, &self.pcp_nonce),
                            Err(pcp::Error::Refused(_))
                        )
                },
            )
            .map(|_| ()),
            Protocol::NatPmp => udp_exchange(
                self.gateway,
                &natpmp::map_request(port, 0, 0),
                RELEASE_WAIT,
                |b| natpmp::parse_map_response(b, port).is_ok(),
            )
            .map(|_| ()),
            Protocol::Upnp => match &self.upnp {
                Some(gw) => upnp::remove(gw, self.external.port(), RELEASE_WAIT),
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => log::info!(
                "{}: deleted the mapping of {}",
                self.protocol,
                self.external
            ),
            Err(e) => log::warn!(
                "{}: could not delete the mapping of {}: {e}",
                self.protocol,
                self.external
            ),
        }
    }
}

/// What [`map`] did.
#[derive(Debug, Default)]
pub struct MapOutcome {
    /// The mapping, if one was granted.
    pub lease: Option<Lease>,
    /// One line per protocol: what it answered.
    pub tried: Vec<(Protocol, String)>,
    /// Time spent.
    pub elapsed: Duration,
}

/// A protocol's answer to discovery.
enum Found {
    Pcp,
    NatPmp(Ipv4Addr),
    Upnp(Box<upnp::Gateway>),
}

/// Asks the router for a mapping; see the module docs. Blocks for at most
/// `protocols.wait` plus one mapping request.
pub fn map(req: &Request) -> MapOutcome {
    let started = Instant::now();
    let mut out = MapOutcome::default();
    let cfg = req.protocols;
    let enabled: Vec<Protocol> = [
        (Protocol::Pcp, cfg.pcp),
        (Protocol::NatPmp, cfg.natpmp),
        (Protocol::Upnp, cfg.upnp),
    ]
    .into_iter()
    .filter_map(|(p, on)| on.then_some(p))
    .collect();
    let gateway = match std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_gateway(&t))
    {
        Some(g) => g,
        None => {
            for p in enabled {
                out.tried.push((p, "no IPv4 default gateway to ask".into()));
            }
            return out;
        }
    };
    let client = match local_ip_toward(gateway) {
        Ok(ip) => ip,
        Err(e) => {
            for p in enabled {
                out.tried
                    .push((p, format!("no local address toward {gateway}: {e}")));
            }
            return out;
        }
    };
    let deadline = started + cfg.wait;
    let (tx, rx) = mpsc::channel::<(Protocol, Result<Found, String>)>();
    for &p in &enabled {
        let tx = tx.clone();
        let wait = cfg.wait;
        std::thread::spawn(move || {
            let found = match p {
                Protocol::Pcp => udp_exchange(gateway, &pcp::announce(client), wait, |b| {
                    pcp::parse_announce(b).is_ok()
                        || natpmp::is_unsupported_version(b)
                        || matches!(pcp::parse_announce(b), Err(pcp::Error::Refused(_)))
                })
                .and_then(|b| match pcp::parse_announce(&b) {
                    Ok(()) => Ok(Found::Pcp),
                    Err(pcp::Error::Refused(c)) => Err(format!("refused ANNOUNCE (result {c})")),
                    Err(pcp::Error::NotOurs) => Err("speaks NAT-PMP only".into()),
                }),
                Protocol::NatPmp => udp_exchange(gateway, &natpmp::address_request(), wait, |b| {
                    !matches!(
                        natpmp::parse_address_response(b),
                        Err(natpmp::Error::NotOurs)
                    )
                })
                .and_then(|b| {
                    natpmp::parse_address_response(&b)
                        .map(Found::NatPmp)
                        .map_err(|e| format!("{e:?}"))
                }),
                Protocol::Upnp => upnp::discover(client, wait).map(|g| Found::Upnp(Box::new(g))),
            };
            let _ = tx.send((p, found));
        });
    }
    drop(tx);
    let mut found: Vec<(Protocol, Found)> = Vec::new();
    let mut reported: Vec<Protocol> = Vec::new();
    while reported.len() < enabled.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((p, Ok(f))) => {
                reported.push(p);
                found.push((p, f));
                // PCP is the first choice: no need to wait for the others.
                if p == Protocol::Pcp {
                    break;
                }
            }
            Ok((p, Err(why))) => {
                reported.push(p);
                out.tried.push((p, why));
            }
            Err(_) => break,
        }
    }
    for p in &enabled {
        if !reported.contains(p) {
            out.tried.push((
                *p,
                format!("no answer from {gateway} in {} ms", cfg.wait.as_millis()),
            ));
        }
    }
    found.sort_by_key(|(p, _)| *p);
    let nonce = nonce_from(req.nonce_seed);
    for (p, f) in found {
        if out.lease.is_some() {
            out.tried
                .push((p, "answers; not used (another protocol mapped)".into()));
            continue;
        }
        let internal = SocketAddrV4::new(client, req.internal_port);
        let lifetime = req.lifetime.as_secs().min(u64::from(u32::MAX)) as u32;
        let result: Result<Lease, String> = match f {
            Found::Pcp => udp_exchange(
                gateway,
                &pcp::map_request(
                    client,
                    nonce,
                    req.internal_port,
                    req.external_port,
                    lifetime,
                ),
                MAP_WAIT,
                |b| !matches!(pcp::parse_map(b, &nonce), Err(pcp::Error::NotOurs)),
            )
            .and_then(|b| pcp::parse_map(&b, &nonce).map_err(|e| format!("MAP {e:?}")))
            .map(|g| Lease {
                protocol: p,
                external: SocketAddr::new(g.external_ip, g.external_port),
                internal,
                gateway,
                pcp_nonce: nonce,
                upnp: None,
            }),
            Found::NatPmp(ext_ip) => udp_exchange(
                gateway,
                &natpmp::map_request(req.internal_port, req.external_port, lifetime),
                MAP_WAIT,
                |b| {
                    !matches!(
                        natpmp::parse_map_response(b, req.internal_port),
                        Err(natpmp::Error::NotOurs)
                    )
                },
            )
            .and_then(|b| {
                natpmp::parse_map_response(&b, req.internal_port).map_err(|e| format!("map {e:?}"))
            })
            .map(|g| Lease {
                protocol: p,
                external: SocketAddr::new(IpAddr::V4(ext_ip), g.external_port),
                internal,
                gateway,
                pcp_nonce: nonce,
                upnp: None,
            }),
            Found::Upnp(gw) => upnp::add(
                &gw,
                req.external_port,
                internal,
                lifetime,
                DESCRIPTION,
                MAP_WAIT,
            )
            .map(|ext_ip| Lease {
                protocol: p,
                external: SocketAddr::new(ext_ip, req.external_port),
                internal,
                gateway,
                pcp_nonce: nonce,
                upnp: Some(gw),
            }),
        };
        match result {
            Ok(lease) => {
                let same = lease.external.port() == req.external_port;
                out.tried.push((
                    p,
                    format!(
                        "mapped {} -> {}{}",
                        lease.external,
                        lease.internal,
                        if same {
                            ""
                        } else {
                            " (not the port asked for)"
                        }
                    ),
                ));
                out.lease = Some(lease);
            }
            Err(e) => out
                .tried
                .push((p, format!("answers, but mapping failed: {e}"))),
        }
    }
    out.tried.sort_by_key(|(p, _)| *p);
    out.elapsed = started.elapsed();
    out
}

/// Sends `request` to the gateway's port 5351 from a connected socket and
/// retransmits (250 ms doubling) until a datagram `accept` likes arrives or
/// `wait` passes. A connected socket hears ICMP "port unreachable", so a
/// router without a daemon fails at once.
fn udp_exchange(
    gateway: Ipv4Addr,
    request: &[u8],
    wait: Duration,
    accept: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + wait;
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
    s.connect((gateway, natpmp::PORT))
        .map_err(|e| e.to_string())?;
    let mut rto = RETRANSMIT_START;
    let mut buf = [0u8; 1100];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "no answer from {gateway} in {} ms",
                wait.as_millis()
            ));
        }
        if let Err(e) = s.send(request) {
            return Err(refusal(gateway, &e));
        }
        let until = (now + rto).min(deadline);
        rto *= 2;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match s.recv(&mut buf) {
                Ok(n) if accept(&buf[..n]) => return Ok(buf[..n].to_vec()),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(refusal(gateway, &e)),
            }
        }
    }
}

fn refusal(gateway: Ipv4Addr, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        format!("{gateway}:{} is closed (port unreachable)", natpmp::PORT)
    } else {
        e.to_string()
    }
}

/// The local address the kernel would use toward `gateway`.
fn local_ip_toward(gateway: Ipv4Addr) -> io::Result<Ipv4Addr> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect((gateway, natpmp::PORT))?;
    match s.local_addr()?.ip() {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(_) => Err(io::Error::other("not IPv4")),
    }
}

/// The default IPv4 gateway from `/proc/net/route`'s text.
pub fn default_gateway(route: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags ...; RTF_GATEWAY = 0x2.
        if f.len() < 4 || f[1] != "00000000" {
            return None;
        }
        let flags = u32::from_str_radix(f[3], 16).ok()?;
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        // The kernel prints the address in host byte order of a
        // little-endian machine: the first octet is the lowest byte.
        (flags & 2 != 0 && gw != 0).then(|| Ipv4Addr::from(gw.to_le_bytes()))
    })
}

fn nonce_from(seed: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seed.to_le_bytes());
    n[8..].copy_from_slice(&(seed.rotate_left(17) as u32).to_le_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_gateway_from_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    lan\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    lan\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway(text), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
        assert_eq!(default_gateway(&text.replace("0003", "0001")), None);
    }

    #[test]
    fn a_closed_port_is_refused_not_waited_for() {
        // Nothing listens on 127.0.0.1:5351 in the test environment: the
        // ICMP "port unreachable" ends the exchange with that reason rather
        // than "no answer" after the 30 s wait.
        let r = udp_exchange(
            Ipv4Addr::LOCALHOST,
            &natpmp::address_request(),
            Duration::from_secs(30),
            |_| true,
        );
        match r {
            Err(e) => assert!(e.contains("closed"), "{e}"),
            Ok(_) => eprintln!("something answers on 127.0.0.1:5351; skipped"),
        }
    }
}
