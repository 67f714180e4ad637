//! `--cluster-dns`: the member list from DNS, resolved on a helper thread.
//!
//! Why the system resolver (`getaddrinfo`, through `ToSocketAddrs`) on a
//! thread, and not a DNS client of psync's own: it reads `/etc/resolv.conf`,
//! `/etc/hosts` and `nsswitch.conf` exactly as every other program on the
//! host does, including the search domains and `ndots` that Kubernetes
//! puts in a pod's `resolv.conf` (so `psync-members` finds
//! `psync-members.NAMESPACE.svc.cluster.local`), and the container image's
//! glibc has its DNS lookup built in (docs/operations.md). What it lacks,
//! the records' TTL, psync does not need: it re-resolves every
//! `--cluster-dns-interval` whatever the TTL says. `getaddrinfo` blocks
//! (seconds, when a DNS server is down), so it never runs in a server loop:
//! this thread resolves, sends the result over a channel, and calls a
//! wake-up function (the loop's `mio::Waker`).
//!
//! A failed resolution is reported and changes nothing: the members keep
//! the last list they had, so a DNS outage does not split the cluster.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One resolution: the sorted, deduplicated addresses of the wanted family,
/// or why there are none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Which resolution this is, from 1.
    pub round: u64,
    /// The members' cluster addresses, or the resolver's error.
    pub result: Result<Vec<SocketAddr>, String>,
}

/// Resolves `name` (with `port`) and keeps the addresses of one family,
/// sorted, without repeats. Blocks.
pub fn resolve(name: &str, port: u16, ipv6: bool) -> Result<Vec<SocketAddr>, String> {
    let found = (name, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {name}: {e}"))?;
    let mut addrs: Vec<SocketAddr> = found.filter(|a| a.is_ipv6() == ipv6).collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        let family = if ipv6 { "AAAA" } else { "A" };
        return Err(format!("{name} has no {family} record"));
    }
    Ok(addrs)
}

/// The resolver thread. Dropping it stops the thread (at once if it is
/// waiting, after the lookup in hand otherwise) without waiting for it.
pub struct Resolver {
    results: Receiver<Resolved>,
    /// Dropped to tell the thread to stop.
    _stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    /// Starts resolving `name` now and every `interval`; calls `wake` after
    /// each resolution is sent.
    pub fn spawn(
        name: String,
        port: u16,
        ipv6: bool,
        interval: Duration,
        wake: impl Fn() + Send + 'static,
    ) -> io::Result<Resolver> {
        let (tx, results) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("psync-dns".into())
            .spawn(move || {
                let mut round = 0;
                loop {
                    let started = Instant::now();
                    round += 1;
                    let result = resolve(&name, port, ipv6);
                    if tx.send(Resolved { round, result }).is_err() {
                        return;
                    }
                    wake();
                    let wait = interval.saturating_sub(started.elapsed());
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Stop asked (the sender dropped), or a message.
                        _ => return,
                    }
                }
            })?;
        Ok(Resolver {
            results,
            _stop: stop,
            thread: Some(thread),
        })
    }

    /// The newest resolution not yet taken, if any (older ones are skipped).
    pub fn latest(&self) -> Option<Resolved> {
        self.results.try_iter().last()
    }

    /// Waits up to `timeout` for the next resolution (at start, for the
    /// first list).
    pub fn wait(&self, timeout: Duration) -> Option<Resolved> {
        self.results.recv_timeout(timeout).ok()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        // The stop channel closes when `_stop` drops, after this; the thread
        // ends on its own. Never join: a lookup may block for seconds.
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn resolves_a_hosts_name_by_family() {
        // `localhost` comes from /etc/hosts on any Linux host.
        let v4 = resolve("localhost", 1025, false).unwrap();
        assert!(v4.contains(&"127.0.0.1:1025".parse().unwrap()), "{v4:?}");
        assert!(v4.iter().all(|a| a.is_ipv4()));
        let literal = resolve("127.0.0.9", 7, false).unwrap();
        assert_eq!(literal, vec!["127.0.0.9:7".parse().unwrap()]);
        assert!(resolve("127.0.0.9", 7, true)
            .unwrap_err()
            .contains("no AAAA"));
        assert!(resolve("name.that-does-not-exist.invalid", 7, false).is_err());
    }

    #[test]
    fn the_thread_resolves_again_and_stops() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let r = Resolver::spawn(
            "127.0.0.7".into(),
            1025,
            false,
            Duration::from_millis(20),
            move || {
                w.fetch_add(1, Ordering::Relaxed);
            },
        )
        .unwrap();
        let first = r.wait(Duration::from_secs(5)).expect("a first resolution");
        assert_eq!(first.round, 1);
        assert_eq!(first.result, Ok(vec!["127.0.0.7:1025".parse().unwrap()]));
        let later = r.wait(Duration::from_secs(5)).expect("a second resolution");
        assert!(later.round >= 2);
        // The first wake-up came before the second resolution was sent.
        assert!(wakes.load(Ordering::Relaxed) >= 1);
        drop(r);
    }
}
