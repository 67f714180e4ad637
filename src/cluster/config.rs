//! The cluster's settings as the flags give them, and their checks. Every
//! error names the flag to fix, in one line.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::key::{ClusterKey, KeyFileError};
use super::MAX_PEERS;

/// The cluster port when `--cluster-bind`, `--cluster-peer` or
/// `--cluster-dns` give none: the one after psync's default client port.
pub const DEFAULT_PORT: u16 = 1025;
/// Default `--cluster-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest `--cluster-timeout`: heartbeats go out four times per timeout,
/// and a loaded loop must not miss four in a row.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(200);
/// Longest `--cluster-timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Default `--cluster-dns-interval`: what CoreDNS gives a headless
/// Service's records as TTL.
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest `--cluster-dns-interval`.
pub const MIN_DNS_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `--cluster-dns-interval`.
pub const MAX_DNS_INTERVAL: Duration = Duration::from_secs(3600);

/// An address as a flag gives it: an IP and maybe a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// The IP address.
    pub ip: IpAddr,
    /// The port, when given.
    pub port: Option<u16>,
}

impl HostPort {
    /// The address, with `default` as the port when none was given.
    pub fn with_default(self, default: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(default))
    }
}

/// Reads `IP`, `IP:PORT`, `IPv6` or `[IPv6]:PORT` (port 1 to 65535).
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(HostPort { ip, port: None });
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(HostPort {
            ip: a.ip(),
            port: Some(a.port()),
        }),
        Ok(_) => Err(format!("'{s}': the port must be 1 to 65535")),
        Err(_) => Err(format!(
            "'{s}' is not IP, IP:PORT or [IPv6]:PORT (a name? use --cluster-dns)"
        )),
    }
}

/// A DNS name and maybe a port, as `--cluster-dns` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsName {
    /// The name to resolve (A or AAAA, as `--cluster-bind`'s family).
    pub name: String,
    /// The members' cluster port, when given.
    pub port: Option<u16>,
}

/// Reads `NAME` or `NAME:PORT`: a host name of letters, digits, `-`, `_`
/// and dots, at most 253 characters.
pub fn parse_dns_name(s: &str) -> Result<DnsName, String> {
    let s = s.trim();
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("'{p}' is not a port from 1 to 65535"))?;
            (n, Some(port))
        }
        None => (s, None),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            // A trailing dot (a fully qualified name) leaves one empty label.
            (label.is_empty() && i > 0 && name.ends_with('.') && name.len() > 1)
                || (!label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        });
    if !valid {
        return Err(format!("'{name}' is not a DNS name"));
    }
    Ok(DnsName {
        name: name.to_owned(),
        port,
    })
}

/// Where the member list comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberSource {
    /// `--cluster-peer`, repeated: every member's cluster address, this
    /// server's included.
    Static(Vec<SocketAddr>),
    /// `--cluster-dns NAME[:PORT]`, resolved every `interval`.
    Dns {
        /// The name.
        name: String,
        /// The members' cluster port.
        port: u16,
        /// `--cluster-dns-interval`.
        interval: Duration,
    },
}

/// Everything the cluster needs to start.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `--cluster-bind`: this member's cluster address, and its identity.
    pub bind: SocketAddr,
    /// The member list.
    pub members: MemberSource,
    /// `--cluster-timeout`: a member silent this long is no longer live.
    pub timeout: Duration,
    /// The shared key, from `--cluster-key-file`.
    pub key: ClusterKey,
}

/// A setting the cluster cannot start with; each names its flag.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Cluster flags without `--cluster-bind`.
    #[error("--cluster-bind ADDR is required with --cluster-peer or --cluster-dns (this server's own cluster address)")]
    NoBind,
    /// `--cluster-bind` with the wildcard address.
    #[error("--cluster-bind {0}: give this server's own address, not a wildcard (the other members know it by this address)")]
    BindUnspecified(SocketAddr),
    /// Cluster flags without `--cluster-key-file`.
    #[error("--cluster-key-file PATH is required with --cluster-peer or --cluster-dns")]
    NoKey,
    /// The key file cannot be read.
    #[error("--cluster-key-file {path}: {reason}")]
    KeyFile {
        /// The path given.
        path: String,
        /// What went wrong (never the secret).
        reason: String,
    },
    /// The static list does not name this server.
    #[error("--cluster-peer: the {count} member addresses do not include this server's --cluster-bind {bind}; give every member the same list, itself included")]
    NotListed {
        /// This server's cluster address.
        bind: SocketAddr,
        /// How many addresses were listed.
        count: usize,
    },
    /// A listed member of the other family.
    #[error("--cluster-peer {peer}: members talk over one address family, and --cluster-bind {bind} is the other")]
    Family {
        /// The member.
        peer: SocketAddr,
        /// This server's cluster address.
        bind: SocketAddr,
    },
    /// Two listed members on one IP.
    #[error("--cluster-peer {0} and {1} share an IP address; a member is an IP address (one server per address)")]
    SharedIp(SocketAddr, SocketAddr),
    /// Too many members.
    #[error("--cluster-peer: {0} members; at most {max}", max = MAX_PEERS + 1)]
    TooMany(usize),
    /// A timeout out of range.
    #[error("--cluster-timeout must be 200ms to 10m")]
    Timeout,
    /// A DNS interval out of range.
    #[error("--cluster-dns-interval must be 100ms to 1h")]
    DnsInterval,
}

/// Longest key file: four secrets of 64 bytes in hex with comments fit
/// many times over; a bigger file is a mistake.
pub const MAX_KEY_FILE_LEN: u64 = 16 << 10;

/// Reads the cluster key from `path`: one line naming the flag when the
/// file is missing, unreadable, readable or writable by others (whoever
/// holds the key can speak as any member: `chmod 600`, or 640 for a group),
/// too large, or holds no valid key.
pub fn read_key_file(path: &Path) -> Result<ClusterKey, ConfigError> {
    let err = |reason: String| ConfigError::KeyFile {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(io_reason(&e)))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(err(format!(
                "others may read or write it (mode {mode:03o}); whoever holds the key can \
                 speak as any member: chmod 600 it"
            )));
        }
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(err(format!(
            "{} bytes; a key file is at most {MAX_KEY_FILE_LEN}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(io_reason(&e)))?;
    ClusterKey::parse(&text).map_err(|e: KeyFileError| err(e.to_string()))
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::InvalidData => "not text (write the secret in hex)".into(),
        _ => format!("cannot read it: {e}"),
    }
}

impl ClusterConfig {
    /// Checks the settings: a specific bind address; a timeout and interval
    /// in range; a static list of one family, one member per IP, at most
    /// [`MAX_PEERS`] + 1 members, this server among them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.ip().is_unspecified() || self.bind.port() == 0 {
            return Err(ConfigError::BindUnspecified(self.bind));
        }
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&self.timeout) {
            return Err(ConfigError::Timeout);
        }
        match &self.members {
            MemberSource::Static(list) => check_static(self.bind, list),
            MemberSource::Dns { interval, .. } => {
                if !(MIN_DNS_INTERVAL..=MAX_DNS_INTERVAL).contains(interval) {
                    return Err(ConfigError::DnsInterval);
                }
                Ok(())
            }
        }
    }
}

fn check_static(bind: SocketAddr, list: &[SocketAddr]) -> Result<(), ConfigError> {
    let mut sorted: Vec<SocketAddr> = list.to_vec();
    sorted.sort();
    sorted.dedup();
    if let Some(peer) = sorted.iter().find(|p| p.is_ipv4() != bind.is_ipv4()) {
        return Err(ConfigError::Family { peer: *peer, bind });
    }
    for w in sorted.windows(2) {
        if w[0].ip() == w[1].ip() {
            return Err(ConfigError::SharedIp(w[0], w[1]));
        }
    }
    if sorted.len() > MAX_PEERS + 1 {
        return Err(ConfigError::TooMany(sorted.len()));
    }
    if !sorted.contains(&bind) {
        return Err(ConfigError::NotListed {
            bind,
            count: sorted.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cfg(bind: &str, peers: &[&str]) -> ClusterConfig {
        ClusterConfig {
            bind: a(bind),
            members: MemberSource::Static(peers.iter().map(|p| a(p)).collect()),
            timeout: DEFAULT_TIMEOUT,
            key: ClusterKey::new(&[&[1u8; 16]]).unwrap(),
        }
    }

    #[test]
    fn host_ports() {
        let hp = parse_host_port("127.0.0.2").unwrap();
        assert_eq!(hp.with_default(1025), a("127.0.0.2:1025"));
        assert_eq!(
            parse_host_port("127.0.0.2:7000").unwrap().with_default(1),
            a("127.0.0.2:7000")
        );
        assert_eq!(
            parse_host_port("::1").unwrap().with_default(9),
            a("[::1]:9")
        );
        assert_eq!(
            parse_host_port("[::1]:7000").unwrap().with_default(9),
            a("[::1]:7000")
        );
        assert!(parse_host_port("127.0.0.2:0").unwrap_err().contains("port"));
        assert!(parse_host_port("psync.local")
            .unwrap_err()
            .contains("--cluster-dns"));
        assert!(parse_host_port("").is_err());
    }

    #[test]
    fn dns_names() {
        assert_eq!(
            parse_dns_name("psync-members.psync.svc.cluster.local:1025"),
            Ok(DnsName {
                name: "psync-members.psync.svc.cluster.local".into(),
                port: Some(1025)
            })
        );
        assert_eq!(parse_dns_name("members").unwrap().port, None);
        assert!(parse_dns_name("members.example.").is_ok());
        for bad in [
            "",
            ":1025",
            "a..b",
            "has space",
            "x:0",
            "x:99999",
            "a/b",
            ".",
        ] {
            assert!(parse_dns_name(bad).is_err(), "{bad}");
        }
        assert!(parse_dns_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn static_lists() {
        let peers = ["127.0.0.2:1025", "127.0.0.3:1025", "127.0.0.4:1025"];
        assert_eq!(cfg("127.0.0.3:1025", &peers).validate(), Ok(()));
        let e = cfg("127.0.0.5:1025", &peers).validate().unwrap_err();
        assert!(matches!(e, ConfigError::NotListed { count: 3, .. }));
        assert!(e.to_string().starts_with("--cluster-peer: "), "{e}");
        assert!(e.to_string().contains("127.0.0.5:1025"), "{e}");
        // The same IP with another port is not this server.
        assert!(cfg("127.0.0.3:1026", &peers).validate().is_err());
        let e = cfg("0.0.0.0:1025", &peers).validate().unwrap_err();
        assert!(
            e.to_string().starts_with("--cluster-bind 0.0.0.0:1025"),
            "{e}"
        );
        let e = cfg("127.0.0.2:1025", &["127.0.0.2:1025", "[::1]:1025"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, ConfigError::Family { .. }), "{e}");
        let e = cfg("127.0.0.2:1025", &["127.0.0.2:1025", "127.0.0.2:1026"])
            .validate()
            .unwrap_err();
        assert!(matches!(e, ConfigError::SharedIp(..)), "{e}");
        // Repeats are one member.
        assert_eq!(
            cfg("127.0.0.2:1025", &["127.0.0.2:1025", "127.0.0.2:1025"]).validate(),
            Ok(())
        );
        let many: Vec<String> = (0..300)
            .map(|i| format!("10.0.{}.{}:1025", i / 200, i % 200))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = cfg("10.0.0.0:1025", &refs).validate().unwrap_err();
        assert_eq!(e, ConfigError::TooMany(300));
        let mut c = cfg("127.0.0.2:1025", &peers[..1]);
        c.timeout = Duration::from_millis(10);
        assert_eq!(c.validate(), Err(ConfigError::Timeout));
    }

    #[test]
    fn key_files_name_the_flag() {
        let dir = std::env::temp_dir().join(format!("psync-cluster-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.key");
        let e = read_key_file(&missing).unwrap_err().to_string();
        assert!(e.starts_with("--cluster-key-file "), "{e}");
        assert!(e.ends_with("no such file"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let short = write("short.key", "00112233445566778899aabbccddee\n", 0o600);
        let e = read_key_file(&short).unwrap_err().to_string();
        assert!(e.contains("15 bytes; it must be 16 to 64 bytes"), "{e}");
        let good = write("good.key", &format!("{}\n", "5a".repeat(32)), 0o640);
        assert_eq!(read_key_file(&good).unwrap().len(), 1);
        let open = write("open.key", &format!("{}\n", "5a".repeat(32)), 0o644);
        let e = read_key_file(&open).unwrap_err().to_string();
        assert!(e.contains("others may read or write it (mode 644)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
