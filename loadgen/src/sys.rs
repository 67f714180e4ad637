//! The operating-system layer, and the only `unsafe` in the load generator:
//! a `timerfd` for waits shorter than the millisecond `epoll_wait` offers,
//! and `getrusage`. Batched sending and receiving use the server's own
//! `psync::sys::SendQueue` and `psync::sys::RecvBatch`: one copy of the
//! `sendmmsg`/`recvmmsg` code for the whole workspace.
//!
//! Linux only: the load generator exists to push a Linux server hard, and
//! these calls are what make that cheap.
#![allow(unsafe_code)]

use std::io;
use std::mem::zeroed;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::Duration;

/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;
/// Longest datagram we send: requests are 8 bytes, malformed ones up to a
/// reply's 32 (to check that a reflected reply is not taken for a request).
pub const MAX_SEND: usize = 32;
/// Bytes kept of a received datagram: more than any reply, so that with
/// `MSG_TRUNC` a longer datagram is seen at its real length.
pub const RECV_LEN: usize = 64;
/// Datagrams one socket can hold unsent (its `SendQueue`). Callers flush at
/// [`BATCH`], so this only fills while the kernel refuses to take more.
pub const OUTBOX_LEN: usize = 4 * BATCH;

/// Turns a `-1` return into the `errno` error.
macro_rules! syscall {
    ($e:expr) => {{
        let ret = $e;
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }};
}

/// A one-shot monotonic timer with nanosecond resolution, pollable by mio
/// (edge-triggered: every expiry after a re-arm is a new event).
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Timer> {
        // SAFETY: plain system call with constant flags; the result is
        // checked before it is used as a descriptor.
        let fd = syscall!(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        Ok(Timer {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once, `after` from now (a zero duration fires at once).
    pub fn arm(&mut self, after: Duration) -> io::Result<()> {
        // A zero it_value would disarm the timer: use the smallest non-zero.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec on the stack; the old value
        // is not asked for.
        syscall!(unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, ptr::null_mut()) })?;
        Ok(())
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: all-zero bytes are a valid rusage, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { zeroed() };
    // SAFETY: RUSAGE_SELF with a pointer to a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use psync::sys::{RecvBatch, SendQueue};
    use std::net::UdpSocket;

    /// A nonblocking mio socket on loopback, as the driver uses.
    fn mio_socket() -> mio::net::UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        mio::net::UdpSocket::from_std(s)
    }

    #[test]
    fn sends_and_receives_batches_over_loopback() {
        let rx = mio_socket();
        let tx = mio_socket();
        let to = rx.local_addr().unwrap();
        let mut outbox = SendQueue::new(OUTBOX_LEN, BATCH);
        for k in 0..100u8 {
            assert!(outbox.push(to, &[k; 8]));
        }
        assert!(outbox.push(to, &[9; MAX_SEND]));
        // Longer than a queue slot: refused, not truncated.
        assert!(!outbox.push(to, &[0; psync::sys::SEND_SLOT_LEN + 1]));
        let done = outbox.flush(&tx);
        assert_eq!(done.sent, 101);
        assert!(outbox.is_empty());

        let mut recv = RecvBatch::with_buf_len(BATCH, RECV_LEN);
        let mut got = Vec::new();
        let tx_port = tx.local_addr().unwrap().port();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 101 && std::time::Instant::now() < deadline {
            match recv.recv(&rx) {
                Ok(n) => {
                    for i in 0..n {
                        let d = recv.get(i).expect("an IPv4 sender");
                        assert_eq!(d.from.port(), tx_port);
                        assert_eq!(d.data.len(), d.len);
                        got.push(d.data.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), 101);
        assert_eq!(got[7], vec![7u8; 8]);
        assert_eq!(got[100], vec![9u8; MAX_SEND]);
        assert_eq!(
            recv.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn an_oversized_datagram_shows_its_real_length() {
        let rx = mio_socket();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[1u8; 200], rx.local_addr().unwrap()).unwrap();
        let mut recv = RecvBatch::with_buf_len(BATCH, RECV_LEN);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match recv.recv(&rx) {
                Ok(1) => break,
                Ok(n) => panic!("{n} datagrams"),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let d = recv.get(0).expect("an IPv4 sender");
        assert_eq!((d.data.len(), d.len), (RECV_LEN, 200));
    }

    #[test]
    fn timer_fires() {
        let mut t = Timer::new().unwrap();
        t.arm(Duration::from_micros(200)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let mut ticks = [0u8; 8];
        // SAFETY: test-only read of 8 bytes into a live buffer.
        let n = unsafe { libc::read(t.as_raw_fd(), ticks.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(u64::from_ne_bytes(ticks), 1);
        assert!(cpu_time() > Duration::ZERO);
    }
}
