//! What a connect learned and tried, for `--json` and the exit-4 message:
//! the NAT classification, the port mapping, each strategy's effort, and
//! the datagrams sent.

use std::fmt::Write as _;

use super::config::Strategy;
use super::nat::{NatReport, NatType};
use super::punch::BirthdayStats;

/// The report of one connect, successful or not.
#[derive(Clone, Debug, Default)]
pub struct ConnectReport {
    /// Our NAT as classified (with a router mapping: `hard-mapped`).
    pub nat: Option<NatType>,
    /// The STUN findings behind it.
    pub classification: NatReport,
    /// Each port-mapping protocol and what it answered.
    pub mapping: Vec<(String, String)>,
    /// The mapped public address, if a router granted one.
    pub mapped: Option<std::net::SocketAddr>,
    /// Strategies that sent anything, over all attempts.
    pub tried: Vec<Strategy>,
    /// Birthday probing's counts, over all attempts.
    pub birthday: BirthdayStats,
    /// Every datagram this side sent: STUN, registrations, punching.
    pub datagrams_sent: u64,
    /// Registrations made.
    pub attempts: u32,
    /// Protocol v2: what the server's reply said (of the last attempt that
    /// got one); `None` with the seed format.
    pub v2: Option<V2Report>,
    /// Protocol v2: cookie replies taken while registering.
    pub cookies: u32,
}

/// What a v2 reply told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V2Report {
    /// Our public address as the server saw it.
    pub your_addr: std::net::SocketAddr,
    /// The partner's NAT as it said (client info), if it knew.
    pub partner_nat: Option<NatType>,
    /// The partner's candidate addresses (only the peer that waited gets them).
    pub partner_candidates: Vec<std::net::SocketAddr>,
}

impl ConnectReport {
    /// Our NAT type, `unknown` if not classified.
    pub fn nat_type(&self) -> NatType {
        self.nat.unwrap_or(NatType::Unknown)
    }

    /// The classification in words, for the failure message.
    pub fn nat_words(&self) -> String {
        let c = &self.classification;
        let mut s = String::from(self.nat_type().name());
        match (c.public, c.public_second) {
            (Some(a), Some(b)) if a == b => {
                let _ = write!(s, " (one public port {} for both server ports", a.port());
            }
            (Some(a), Some(b)) => {
                let _ = write!(s, " (public port {} to the server, {} to its STUN port", a.port(), b.port());
            }
            // Classification runs only with a --stun-port, so a missing
            // answer is loss (every request or answer dropped) or a server
            // run without that port: say both, blame neither.
            (Some(a), None) => {
                let _ = write!(s, " (public {a}; the server's STUN port answered none of our requests: all lost, or the server runs without --stun-port");
            }
            (None, Some(b)) => {
                let _ = write!(s, " (public {b} to the server's STUN port; its main port answered none of our requests: all lost");
            }
            _ if !c.attempted => s.push_str(" (not classified: run the server with --stun-port and pass the same --stun-port here"),
            _ => s.push_str(" (the server answered no STUN request"),
        }
        if let Some(p) = c.port_preserved() {
            s.push_str(if p {
                ", port preserved"
            } else {
                ", port not preserved"
            });
        }
        s.push(')');
        match self.mapped {
            Some(m) => {
                let _ = write!(s, "; router mapping {m}");
            }
            None if !self.mapping.is_empty() => {
                s.push_str("; no router mapping (");
                for (i, (p, why)) in self.mapping.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    let _ = write!(s, "{p}: {why}");
                }
                s.push(')');
            }
            None => {}
        }
        s
    }

    /// The report's JSON fields (without braces), appended to the result line.
    pub fn json_fields(&self) -> String {
        let c = &self.classification;
        let addr = |a: Option<std::net::SocketAddr>| match a {
            Some(a) => format!("\"{a}\""),
            None => "null".into(),
        };
        let preserved = match c.port_preserved() {
            Some(p) => p.to_string(),
            None => "null".into(),
        };
        let mut mapping = String::new();
        for (i, (p, why)) in self.mapping.iter().enumerate() {
            if i > 0 {
                mapping.push(',');
            }
            let _ = write!(mapping, "\"{}\":\"{}\"", escape(p), escape(why));
        }
        let tried: Vec<String> = self.tried.iter().map(|s| format!("\"{s}\"")).collect();
        let v2 = match &self.v2 {
            Some(v) => {
                let cands: Vec<String> = v
                    .partner_candidates
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect();
                format!(
                    "{{\"your_addr\":\"{}\",\"partner_nat\":{},\"partner_candidates\":[{}],\"cookies\":{}}}",
                    v.your_addr,
                    v.partner_nat
                        .map_or("null".to_string(), |n| format!("\"{}\"", n.name())),
                    cands.join(","),
                    self.cookies
                )
            }
            None => "null".into(),
        };
        format!(
            "\"nat\":{{\"type\":\"{}\",\"public\":{},\"public_second\":{},\"port_preserved\":{}}},\
             \"mapping\":{{\"mapped\":{},\"protocols\":{{{}}}}},\"tried\":[{}],\
             \"birthday\":{{\"sockets\":{},\"probes\":{},\"meetings\":{}}},\"datagrams_sent\":{},\
             \"v2\":{}",
            self.nat_type(),
            addr(c.public),
            addr(c.public_second),
            preserved,
            addr(self.mapped),
            mapping,
            tried.join(","),
            self.birthday.sockets,
            self.birthday.probes,
            self.birthday.meetings,
            self.datagrams_sent,
            v2
        )
    }
}

/// Escapes a string for a JSON string literal.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_json_say_what_was_learned() {
        let mut r = ConnectReport {
            nat: Some(NatType::Hard),
            classification: NatReport {
                local: Some("0.0.0.0:40001".parse().unwrap()),
                public: Some("198.18.11.2:5000".parse().unwrap()),
                public_second: Some("198.18.11.2:6000".parse().unwrap()),
                attempted: true,
            },
            mapping: vec![("pcp".into(), "10.1.0.1:5351 is closed \"x\"".into())],
            ..Default::default()
        };
        let w = r.nat_words();
        assert!(w.starts_with("hard (public port 5000 to the server, 6000 to its STUN port, port not preserved); no router mapping (pcp: "), "{w}");
        let j = format!("{{{}}}", r.json_fields());
        assert!(j.contains("\"type\":\"hard\""), "{j}");
        assert!(j.contains("\\\"x\\\""), "{j}");
        r.mapped = Some("198.18.11.2:5000".parse().unwrap());
        assert!(r.nat_words().ends_with("router mapping 198.18.11.2:5000"));
    }

    #[test]
    fn unknown_says_which_port_stayed_silent() {
        let public = "198.18.11.2:5000".parse().unwrap();
        let mut r = ConnectReport {
            nat: Some(NatType::Unknown),
            classification: NatReport {
                local: Some("0.0.0.0:40001".parse().unwrap()),
                public: Some(public),
                public_second: None,
                attempted: true,
            },
            ..Default::default()
        };
        let w = r.nat_words();
        assert!(w.starts_with("unknown (public 198.18.11.2:5000; the server's STUN port answered none of our requests: all lost, or the server runs without --stun-port, port not preserved)"), "{w}");
        // Only the STUN port answered: not "the server answered no STUN request".
        r.classification.public = None;
        r.classification.public_second = Some(public);
        let w = r.nat_words();
        assert_eq!(w, "unknown (public 198.18.11.2:5000 to the server's STUN port; its main port answered none of our requests: all lost)");
        r.classification.public_second = None;
        assert_eq!(
            r.nat_words(),
            "unknown (the server answered no STUN request)"
        );
    }
}
