//! The admission gate: what the loop lets through to the engine, after the
//! per-source rate limiter and before the engine.
//!
//! [`Gate::admit`] takes one datagram, its source, the rate limiter's verdict
//! and the time, and says what to do with it ([`Verdict`]); the v2 requests
//! it lets on are collected, and [`Gate::check_tokens`] then checks their
//! tokens for the whole batch at once (their MACs overlap: about half the
//! cost of checking them one by one) and keeps those the engine may have.
//! The gate owns no socket and reads no clock, so it is unit-tested without
//! a network, and each worker's loop calls it with a few lines. What it
//! does, in order (PROTOCOL.md, "The cookie exchange", is the contract):
//!
//! 1. A datagram that is not [`v2::REQUEST_LEN`] bytes long goes to the
//!    engine as before protocol v2 (seed requests, and anything the engine
//!    counts as `bad_size`), unless its source is over its rate
//!    (`rate_limited`) or it is an 8-byte seed request under
//!    `--require-auth` (`seed_refused`). No reply either way.
//! 2. A v2-sized datagram from a source that cannot be a peer (port 0,
//!    unspecified, multicast, broadcast, v4-mapped IPv6) is dropped
//!    (`v2_bad_source`), and one that does not parse as a v2 request
//!    (`v2_malformed`): before any MAC, and without a reply.
//! 3. **Cookies.** While the source is within its rate (the loop's
//!    limiter: the *unvalidated* budget), the request's cookie is not even
//!    looked at. Once the source is over it (the source is *under
//!    pressure*), a request is let on only if it carries a cookie valid for
//!    its exact address and port (one MAC), and is then charged to a
//!    separate *validated* budget per source (`cookie_validated`; over that
//!    too: `rate_limited`). A forged datagram cannot carry the victim's
//!    cookie, which only ever went to the victim's address, so a forged
//!    flood spends only the unvalidated budget. A request without a valid
//!    cookie from a source under pressure is answered with a 40-byte cookie
//!    reply (`cookie_sent`), at most one per [`COOKIE_REPLY_SPACING_MS`] per
//!    address and port, and otherwise dropped (`rate_limited`).
//! 4. **Tokens** ([`Gate::check_tokens`], [`KeySet::verify_batch`]) at Unix
//!    time `now`: an unknown key, an
//!    expired token and a bad MAC (forged, another pair, the other
//!    direction) are dropped without a reply and counted apart
//!    (`auth_failed_unknown_key`, `auth_failed_expired`,
//!    `auth_failed_bad_mac`). With no key file, every v2 request is an
//!    unknown key. Admitted requests (`v2_admitted`) go to the engine.
//!
//! Why cookie replies are spaced per address *and port*, not per source:
//! a budget per IP is exactly what a forger who knows only the victim's IP
//! could spend to keep the victim from ever getting a cookie. A cookie reply
//! is a quarter of the request's size, so reflecting through psync gains an
//! attacker nothing over sending to the victim directly.
//!
//! Per datagram the gate costs at most one cookie MAC (only under
//! pressure) and one token MAC, and nothing for seed requests. It never
//! allocates, logs or formats.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ratelimit::{RateLimit, RateLimiter};
use crate::auth::{CookieSecret, KeySet, TokenError};
use crate::engine::source::is_bogus;
use crate::stats::IoCounters;
use crate::table::keyed_hash;
use crate::wire::{seed, v2};

/// Fewest milliseconds between two cookie replies to one address and port.
/// A client needs one cookie per minute or two (a cookie lives 60 to 120 s)
/// and retransmits every 250 ms to 2 s, so 100 ms never delays a real one;
/// a forged stream in its name gets at most ten per second per port.
pub const COOKIE_REPLY_SPACING_MS: u32 = 100;
/// Addresses whose last cookie reply is remembered (direct-mapped; a newer
/// address takes the slot, which only ever lets one more reply through).
const COOKIE_REPLY_SLOTS: usize = 4096;
/// Largest key file read: a full one (256 keys of 64 bytes in hex, with
/// comments) is well under this; anything bigger is a mistake.
pub const MAX_KEY_FILE_LEN: u64 = 1 << 20;

/// How the gate is set up: the `--auth-key-file` and `--require-auth` flags.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// The keys tokens are checked against; `None`: no v2 (every v2 request
    /// is counted as an unknown key).
    pub keys: Option<Arc<KeySet>>,
    /// Where the keys were read from; a reload (SIGHUP) reads it again.
    pub key_file: Option<PathBuf>,
    /// Refuse seed-format requests (`--require-auth`).
    pub require_auth: bool,
    /// The cookie secret (16 to 64 bytes); `None` draws 32 random bytes at
    /// start. Servers that must accept each other's cookies share one.
    pub cookie_secret: Option<Vec<u8>>,
}

impl AuthConfig {
    /// Reads the keys from `path` ([`load_key_file`]) and remembers the
    /// path for reloads.
    pub fn from_key_file(path: &Path, require_auth: bool) -> Result<AuthConfig, String> {
        Ok(AuthConfig {
            keys: Some(Arc::new(load_key_file(path)?)),
            key_file: Some(path.to_path_buf()),
            require_auth,
            cookie_secret: None,
        })
    }
}

/// Reads and parses a key file. Refused: a file others can read or write
/// (it holds secrets that let anyone issue tokens: `chmod 600`, or 640 for a
/// group), one larger than [`MAX_KEY_FILE_LEN`], and any line
/// [`KeySet::parse`] refuses (the error names the line, never a secret).
pub fn load_key_file(path: &Path) -> Result<KeySet, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("key file {shown}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(format!(
                "key file {shown}: others may read or write it (mode {mode:03o}); \
                 it holds secrets that issue tokens: chmod 600 it"
            ));
        }
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(format!(
            "key file {shown}: {} bytes; a key file is at most {MAX_KEY_FILE_LEN}",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("key file {shown}: {e}"))?;
    KeySet::parse(&text).map_err(|e| format!("key file {shown}: {e}"))
}

/// Reads the key file again for a reload: the keys, and a line saying what
/// they are (for the log), or why the file cannot be used.
pub fn reload_key_file(path: &Path) -> Result<(Arc<KeySet>, String), String> {
    let keys = load_key_file(path)?;
    let ids: Vec<String> = keys.ids().map(|id| id.to_string()).collect();
    let what = format!(
        "{} auth key(s) from {} (IDs {}; tokens are issued with {})",
        keys.len(),
        path.display(),
        ids.join(", "),
        keys.last().id()
    );
    Ok((Arc::new(keys), what))
}

/// The time as the gate needs it, read by the loop once per batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Unix seconds (wall clock): token expiry and cookie epochs.
    pub unix_secs: u64,
    /// The loop's monotonic milliseconds (as the rate limiter takes them).
    pub millis: u32,
}

impl Clock {
    /// Unix seconds now (0 if the system clock is before 1970).
    pub fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// What to do with a datagram.
// A verdict lives on the stack for one datagram; boxing the request would
// allocate per datagram.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the engine's seed-format path (which also drops and counts
    /// what is no request at all).
    Engine,
    /// A well-formed v2 request past the cookie check whose token is still to
    /// be checked: collect it with its source for [`Gate::check_tokens`].
    CheckToken(v2::Request),
    /// Send this cookie reply to the datagram's source.
    Cookie(v2::CookieReply),
    /// Dropped without a reply; counted.
    Drop,
}

/// Spacing of cookie replies per address and port (see the module docs).
struct CookieSpacing {
    /// `(key, ms of the last reply)`; key 0 is an empty slot.
    slots: Box<[(u64, u32)]>,
    seed: [u64; 2],
}

impl CookieSpacing {
    fn new(seed: [u64; 2]) -> CookieSpacing {
        CookieSpacing {
            slots: vec![(0, 0); COOKIE_REPLY_SLOTS].into_boxed_slice(),
            seed: [seed[0], seed[1] | 1],
        }
    }

    /// True (and remembered) when `to` may get a cookie reply at `now`.
    fn allow(&mut self, to: SocketAddr, now: u32) -> bool {
        let ip = match to.ip().to_canonical() {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let h = keyed_hash(
            (ip >> 64) as u64 ^ keyed_hash(ip as u64 ^ u64::from(to.port()) << 48, self.seed),
            self.seed,
        );
        let key = h | 1;
        let i = ((u128::from(h) * self.slots.len() as u128) >> 64) as usize;
        let (k, last) = self.slots[i];
        if k == key && now.wrapping_sub(last) < COOKIE_REPLY_SPACING_MS {
            return false;
        }
        self.slots[i] = (key, now);
        true
    }
}

/// The admission gate; see the module docs.
pub struct Gate {
    keys: Option<Arc<KeySet>>,
    key_file: Option<PathBuf>,
    require_auth: bool,
    cookies: CookieSecret,
    /// The validated budget: per source, as the loop's limiter, for requests
    /// with a valid cookie from a source over its unvalidated budget.
    validated: Option<RateLimiter>,
    cookie_replies: CookieSpacing,
    /// [`Gate::check_tokens`]'s verdicts for the batch in hand (capacity
    /// reserved for the largest batch, so it never allocates).
    passed: Vec<bool>,
}

impl Gate {
    /// A gate for `auth`, with the same per-source rate for the validated
    /// budget as `rate` gives the unvalidated one. `seed` keys its tables;
    /// `cookie_secret` is used when `auth` has none (the server draws it
    /// from the OS).
    pub fn new(
        auth: &AuthConfig,
        rate: RateLimit,
        seed: [u64; 2],
        cookie_secret: &[u8; 32],
    ) -> Result<Gate, String> {
        let secret = auth.cookie_secret.as_deref().unwrap_or(cookie_secret);
        let cookies = CookieSecret::new(secret).map_err(|e| format!("the cookie secret: {e}"))?;
        if auth.require_auth && auth.keys.is_none() {
            return Err("--require-auth needs --auth-key-file (no token could pass)".into());
        }
        Ok(Gate {
            keys: auth.keys.clone(),
            key_file: auth.key_file.clone(),
            require_auth: auth.require_auth,
            cookies,
            validated: RateLimiter::new(rate, [seed[1], seed[0] ^ 0x7661_6c69_6461_7465]),
            cookie_replies: CookieSpacing::new([seed[0] ^ 0x636f_6f6b_6965, seed[1]]),
            passed: Vec::with_capacity(super::MAX_BATCH),
        })
    }

    /// The keys in force.
    pub fn keys(&self) -> Option<&KeySet> {
        self.keys.as_deref()
    }

    /// Puts `keys` in force from the next datagram on. Pending
    /// registrations are the engine's and are not touched.
    pub fn set_keys(&mut self, keys: Arc<KeySet>) {
        self.keys = Some(keys);
    }

    /// Re-reads the key file (SIGHUP): `None` without one; `Some(Ok(what))`
    /// when the new keys are in force; `Some(Err(why))` when the file could
    /// not be used, and the old keys stay.
    pub fn reload(&mut self) -> Option<Result<String, String>> {
        let path = self.key_file.clone()?;
        Some(reload_key_file(&path).map(|(keys, what)| {
            self.set_keys(keys);
            what
        }))
    }

    /// Makes this gate one of `workers` (`--workers`): its validated budget
    /// allows each source its share, as the loop's limiter does.
    pub fn shared_by(&mut self, workers: u32) {
        if let Some(l) = self.validated.as_mut() {
            l.shared_by(workers);
        }
    }

    /// Whether [`Gate::admit`] takes `datagram` through the v2 steps (2 and
    /// 3), by its length: the only ones that read `now.unix_secs` (tokens
    /// and cookies), so that the loop reads the wall clock only for batches
    /// that hold one.
    #[inline]
    pub fn takes_v2_steps(datagram: &[u8]) -> bool {
        datagram.len() == v2::REQUEST_LEN
    }

    /// Decides what becomes of `datagram` from `from`: see the module docs.
    /// `within_rate` is the loop's rate limiter's verdict for this datagram
    /// (false: the source is over its unvalidated budget). Counts what it
    /// drops and answers in `io`; never allocates.
    ///
    /// Inlined, so that a seed request (step 1) costs the loop a few
    /// comparisons; the v2 steps are a call.
    #[inline]
    pub fn admit(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        within_rate: bool,
        now: Clock,
        io: &mut IoCounters,
    ) -> Verdict {
        if !Self::takes_v2_steps(datagram) {
            if !within_rate {
                io.rate_limited += 1;
                return Verdict::Drop;
            }
            if self.require_auth && datagram.len() == seed::REQUEST_LEN {
                io.seed_refused += 1;
                return Verdict::Drop;
            }
            return Verdict::Engine;
        }
        self.admit_v2(datagram, from, within_rate, now, io)
    }

    /// [`Gate::admit`] for a datagram of [`v2::REQUEST_LEN`] bytes (steps 2
    /// and 3).
    #[inline(never)]
    fn admit_v2(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        within_rate: bool,
        now: Clock,
        io: &mut IoCounters,
    ) -> Verdict {
        if is_bogus(from) {
            io.v2_bad_source += 1;
            return Verdict::Drop;
        }
        let Ok(req) = v2::Request::parse(datagram) else {
            io.v2_malformed += 1;
            return Verdict::Drop;
        };
        if !within_rate {
            let validated = req
                .cookie
                .is_some_and(|c| self.cookies.verify(&c, from, now.unix_secs).is_ok());
            if !validated {
                if self.cookie_replies.allow(from, now.millis) {
                    io.cookie_sent += 1;
                    return Verdict::Cookie(v2::CookieReply {
                        pair: req.pair(),
                        cookie: self.cookies.issue(from, now.unix_secs),
                    });
                }
                io.rate_limited += 1;
                return Verdict::Drop;
            }
            if let Some(l) = self.validated.as_mut() {
                if !l.allow(from.ip(), now.millis) {
                    io.rate_limited += 1;
                    return Verdict::Drop;
                }
            }
            io.cookie_validated += 1;
        }
        Verdict::CheckToken(req)
    }

    /// Checks the tokens of the requests [`Gate::admit`] let on (`batch`,
    /// with their sources) at Unix time `unix_secs`, and keeps in `batch`,
    /// in order, only those with a valid token (`v2_admitted`): what the
    /// engine may have. The others are counted by reason. Allocates nothing
    /// for batches up to [`super::MAX_BATCH`].
    pub fn check_tokens(
        &mut self,
        batch: &mut Vec<(v2::Request, SocketAddr)>,
        unix_secs: u64,
        io: &mut IoCounters,
    ) {
        let Gate { keys, passed, .. } = self;
        passed.clear();
        let mut count = |r: Result<u32, TokenError>| {
            match r {
                Ok(_) => io.v2_admitted += 1,
                Err(TokenError::UnknownKey) => io.auth_failed_unknown_key += 1,
                Err(TokenError::Expired) => io.auth_failed_expired += 1,
                Err(TokenError::BadMac) => io.auth_failed_bad_mac += 1,
            }
            passed.push(r.is_ok());
        };
        match keys.as_deref() {
            Some(keys) => {
                let b = &*batch;
                keys.verify_batch(b.len(), |k| &b[k].0.token, unix_secs, |_, r| count(r));
            }
            None => batch
                .iter()
                .for_each(|_| count(Err(TokenError::UnknownKey))),
        }
        let mut k = 0;
        batch.retain(|_| {
            k += 1;
            passed[k - 1]
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{issue_token, Key};
    use crate::wire::v2::{Candidates, ClientInfo, Pair};

    const NOW: u64 = 1_700_000_000;
    const A: &str = "192.0.2.1:4000";

    fn keys() -> Arc<KeySet> {
        Arc::new(
            KeySet::from_keys([
                Key::new(1, &[1; 32]).unwrap(),
                Key::new(2, &[2; 32]).unwrap(),
            ])
            .unwrap(),
        )
    }

    fn gate(require_auth: bool, rate: RateLimit) -> Gate {
        let auth = AuthConfig {
            keys: Some(keys()),
            require_auth,
            ..AuthConfig::default()
        };
        Gate::new(&auth, rate, [3, 4], &[9; 32]).unwrap()
    }

    fn request(key: u32, expiry: u64, pair: Pair, cookie: Option<v2::Cookie>) -> [u8; 152] {
        let k = Key::new(key, &[key as u8; 32]).unwrap();
        v2::Request {
            token: issue_token(&k, pair, expiry),
            cookie,
            info: ClientInfo(1),
            candidates: Candidates::EMPTY,
        }
        .to_bytes()
    }

    /// `admit`, then `check_tokens` on what it let on: the whole gate for
    /// one datagram, with the engine's input as `Ok`.
    #[allow(clippy::result_large_err)]
    fn pass(
        g: &mut Gate,
        d: &[u8],
        from: SocketAddr,
        within_rate: bool,
        now: Clock,
        io: &mut IoCounters,
    ) -> Result<v2::Request, Verdict> {
        match g.admit(d, from, within_rate, now, io) {
            Verdict::CheckToken(req) => {
                let mut batch = vec![(req, from)];
                g.check_tokens(&mut batch, now.unix_secs, io);
                batch.pop().map(|(r, _)| r).ok_or(Verdict::Drop)
            }
            other => Err(other),
        }
    }

    fn clock(ms: u32) -> Clock {
        Clock {
            unix_secs: NOW,
            millis: ms,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const RATE: RateLimit = RateLimit {
        per_second: 10,
        burst: 2,
        sources: 64,
    };

    #[test]
    fn seed_requests_pass_unless_auth_is_required() {
        let seed = [1, 0, 0, 0, 2, 0, 0, 0];
        let mut io = IoCounters::default();
        let mut g = gate(false, RATE);
        assert_eq!(
            pass(&mut g, &seed, addr(A), true, clock(0), &mut io),
            Err(Verdict::Engine)
        );
        // Garbage of other sizes goes to the engine, which counts bad_size.
        assert_eq!(
            pass(&mut g, &[0; 9], addr(A), true, clock(0), &mut io),
            Err(Verdict::Engine)
        );
        assert_eq!(
            pass(&mut g, &seed, addr(A), false, clock(0), &mut io),
            Err(Verdict::Drop)
        );
        assert_eq!(io.rate_limited, 1);
        let mut g = gate(true, RATE);
        assert_eq!(
            pass(&mut g, &seed, addr(A), true, clock(0), &mut io),
            Err(Verdict::Drop)
        );
        assert_eq!(
            pass(&mut g, &[0; 9], addr(A), true, clock(0), &mut io),
            Err(Verdict::Engine)
        );
        assert_eq!(io.seed_refused, 1);
    }

    #[test]
    fn every_token_failure_is_dropped_and_counted_by_reason() {
        let mut io = IoCounters::default();
        let mut g = gate(false, RATE);
        let pair = Pair::new(7, 9);
        let good = request(2, NOW + 60, pair, None);
        let Ok(req) = pass(&mut g, &good, addr(A), true, clock(0), &mut io) else {
            panic!("a good token was refused")
        };
        assert_eq!(req.pair(), pair);
        // Unknown key, expired (past the 30 s of skew), bad MAC: another
        // pair's MAC, the other direction's, and a flipped bit.
        assert_eq!(
            pass(
                &mut g,
                &request(3, NOW + 60, pair, None),
                addr(A),
                true,
                clock(0),
                &mut io
            ),
            Err(Verdict::Drop)
        );
        assert_eq!(
            pass(
                &mut g,
                &request(1, NOW - 31, pair, None),
                addr(A),
                true,
                clock(0),
                &mut io
            ),
            Err(Verdict::Drop)
        );
        let mut other = good;
        other[v2::field::TOKEN][..16]
            .copy_from_slice(&request(2, NOW + 60, pair.counterpart(), None)[8..24]);
        let mut flipped = good;
        flipped[v2::field::MAC.start] ^= 1;
        for bad in [other, flipped] {
            assert_eq!(
                pass(&mut g, &bad, addr(A), true, clock(0), &mut io),
                Err(Verdict::Drop)
            );
        }
        assert_eq!(
            (
                io.v2_admitted,
                io.auth_failed_unknown_key,
                io.auth_failed_expired,
                io.auth_failed_bad_mac
            ),
            (1, 1, 1, 2)
        );
        // Within the skew allowance it still passes.
        let late = request(1, NOW - 30, pair, None);
        assert!(pass(&mut g, &late, addr(A), true, clock(0), &mut io).is_ok());
        // Without keys every v2 request is an unknown key.
        let mut g = Gate::new(&AuthConfig::default(), RATE, [0, 0], &[1; 32]).unwrap();
        assert_eq!(
            pass(&mut g, &good, addr(A), true, clock(0), &mut io),
            Err(Verdict::Drop)
        );
        assert_eq!(io.auth_failed_unknown_key, 2);
    }

    #[test]
    fn bad_sources_and_malformed_requests_cost_no_mac() {
        let mut io = IoCounters::default();
        let mut g = gate(false, RATE);
        let good = request(1, NOW + 60, Pair::new(1, 2), None);
        for bad in [
            "192.0.2.1:0",
            "0.0.0.0:5",
            "[::ffff:192.0.2.1]:5",
            "[ff02::1]:9",
        ] {
            assert_eq!(
                pass(&mut g, &good, addr(bad), true, clock(0), &mut io),
                Err(Verdict::Drop)
            );
        }
        let mut malformed = good;
        malformed[4] = 3; // version 3
        assert_eq!(
            pass(&mut g, &malformed, addr(A), true, clock(0), &mut io),
            Err(Verdict::Drop)
        );
        assert_eq!((io.v2_bad_source, io.v2_malformed), (4, 1));
        assert_eq!(io.auth_failed_bad_mac + io.v2_admitted, 0);
    }

    #[test]
    fn under_pressure_a_cookie_is_asked_for_then_honoured() {
        let mut io = IoCounters::default();
        let mut g = gate(false, RATE);
        let pair = Pair::new(1, 2);
        let bare = request(1, NOW + 60, pair, None);
        // Within the rate: no cookie needed, none looked at.
        assert!(pass(&mut g, &bare, addr(A), true, clock(0), &mut io).is_ok());
        // Over it: a cookie reply, never longer than the request.
        let Err(Verdict::Cookie(reply)) = pass(&mut g, &bare, addr(A), false, clock(0), &mut io)
        else {
            panic!("no cookie reply")
        };
        assert_eq!(reply.pair, pair);
        assert!(reply.to_bytes().len() < bare.len());
        // The next cookie reply to the same address waits its spacing.
        assert_eq!(
            pass(&mut g, &bare, addr(A), false, clock(50), &mut io),
            Err(Verdict::Drop)
        );
        assert_eq!(io.rate_limited, 1);
        // With the cookie the request passes, charged to the validated budget
        // (burst 2, then 10/s).
        let with = request(1, NOW + 60, pair, Some(reply.cookie));
        for _ in 0..2 {
            assert!(pass(&mut g, &with, addr(A), false, clock(60), &mut io).is_ok());
        }
        assert_eq!(
            pass(&mut g, &with, addr(A), false, clock(60), &mut io),
            Err(Verdict::Drop)
        );
        assert!(pass(&mut g, &with, addr(A), false, clock(170), &mut io).is_ok());
        assert_eq!(
            (io.cookie_sent, io.cookie_validated, io.rate_limited),
            (1, 3, 2)
        );
        // The cookie is good for this address and port only: from another
        // port it is no cookie (and that port gets its own cookie reply).
        let elsewhere = addr("192.0.2.1:4001");
        assert!(matches!(
            pass(&mut g, &with, elsewhere, false, clock(200), &mut io),
            Err(Verdict::Cookie(_))
        ));
        // It lasts its epoch and the next, not longer.
        let later = Clock {
            unix_secs: NOW + 3 * crate::auth::COOKIE_EPOCH_SECS,
            millis: 400,
        };
        let with_late = request(1, NOW + 600, pair, Some(reply.cookie));
        assert!(matches!(
            pass(&mut g, &with_late, addr(A), false, later, &mut io),
            Err(Verdict::Cookie(_))
        ));
    }

    #[test]
    fn forged_requests_do_not_spend_the_validated_budget() {
        // A forger in A's name spends A's unvalidated budget (the loop's
        // limiter says "over") and cannot carry A's cookie; A's own
        // requests with its cookie still pass.
        let mut io = IoCounters::default();
        let mut g = gate(false, RATE);
        let pair = Pair::new(1, 2);
        let bare = request(1, NOW + 60, pair, None);
        let Err(Verdict::Cookie(reply)) = pass(&mut g, &bare, addr(A), false, clock(0), &mut io)
        else {
            panic!("no cookie reply")
        };
        let mine = request(1, NOW + 60, pair, Some(reply.cookie));
        let forged_cookie = v2::Cookie::new([7; 16]).unwrap();
        let mut answered = 0;
        for t in 0..1000u32 {
            let ms = 1 + t;
            // 100 forged datagrams per ms: no cookie, a made-up cookie, a
            // cookie for another port.
            for f in 0..100 {
                let forged = match f % 3 {
                    0 => request(1, NOW + 60, Pair::new(5, 6), None),
                    1 => request(1, NOW + 60, Pair::new(5, 6), Some(forged_cookie)),
                    _ => request(
                        1,
                        NOW + 60,
                        Pair::new(5, 6),
                        Some(g.cookies.issue(addr("192.0.2.1:9"), NOW)),
                    ),
                };
                let v = pass(&mut g, &forged, addr(A), false, clock(ms), &mut io);
                assert!(
                    matches!(v, Err(Verdict::Drop | Verdict::Cookie(_))),
                    "{v:?}"
                );
            }
            // A retransmits every 250 ms.
            if t % 250 == 0 && pass(&mut g, &mine, addr(A), false, clock(ms), &mut io).is_ok() {
                answered += 1;
            }
        }
        assert_eq!(answered, 4);
        // The forgers got at most one cookie reply per 100 ms, all to A's
        // own address (where a real forger cannot read them).
        assert!(io.cookie_sent <= 1 + 10, "{}", io.cookie_sent);
    }

    #[test]
    fn reload_keeps_the_old_keys_on_a_bad_file_and_takes_good_ones() {
        let dir = std::env::temp_dir().join(format!("psync-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        };
        let hex1 = "01".repeat(32);
        let hex2 = "02".repeat(32);
        write(&format!("1 {hex1}\n"), 0o600);
        let auth = AuthConfig::from_key_file(&path, false).unwrap();
        let mut g = Gate::new(&auth, RATE, [0, 1], &[5; 32]).unwrap();
        assert_eq!(g.keys().unwrap().ids().collect::<Vec<_>>(), [1]);
        write(&format!("1 {hex1}\n2 {hex2}\n"), 0o600);
        let what = g.reload().unwrap().unwrap();
        assert!(
            what.contains("2 auth key(s)") && what.contains("IDs 1, 2"),
            "{what}"
        );
        write(&format!("1 {hex1}\n2 zz\n"), 0o600);
        let why = g.reload().unwrap().unwrap_err();
        assert!(why.contains("line 2") && !why.contains(&hex1), "{why}");
        assert_eq!(g.keys().unwrap().ids().collect::<Vec<_>>(), [1, 2]);
        #[cfg(unix)]
        {
            write(&format!("3 {hex1}\n"), 0o644);
            let why = g.reload().unwrap().unwrap_err();
            assert!(why.contains("chmod 600"), "{why}");
            assert!(AuthConfig::from_key_file(&path, false).is_err());
        }
        assert_eq!(g.keys().unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
        // Without a key file there is nothing to reload.
        let mut g = gate(false, RATE);
        assert!(g.reload().is_none());
        assert!(Gate::new(
            &AuthConfig {
                require_auth: true,
                ..AuthConfig::default()
            },
            RATE,
            [0, 0],
            &[0; 32]
        )
        .is_err());
    }
}
