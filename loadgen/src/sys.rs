//! The operating-system layer, and the only `unsafe` in the load generator:
//! `sendmmsg` over preallocated arrays, a `timerfd` for waits shorter than
//! the millisecond `epoll_wait` offers, and `getrusage`. Receiving uses the
//! server's own batch, `psync::sys::RecvBatch`.
//!
//! Linux only: the load generator exists to push a Linux server hard, and
//! these calls are what make that cheap.
#![allow(unsafe_code)]

use std::io;
use std::mem::zeroed;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::Duration;

use socket2::SockAddr;

/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;
/// Longest datagram we send: requests are 8 bytes, malformed ones up to a
/// reply's 32 (to check that a reflected reply is not taken for a request).
pub const MAX_SEND: usize = 32;
/// Bytes kept of a received datagram: more than any reply, so that with
/// `MSG_TRUNC` a longer datagram is seen at its real length.
pub const RECV_LEN: usize = 64;
/// Datagrams one socket can hold unsent. Callers flush at [`BATCH`], so this
/// only fills while the kernel refuses to take more.
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

#[derive(Clone, Copy)]
struct Item {
    len: u8,
    bytes: [u8; MAX_SEND],
}

/// One socket's queue of datagrams to the server.
pub struct Outbox {
    items: Box<[Item]>,
    head: usize,
    len: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            items: vec![
                Item {
                    len: 0,
                    bytes: [0; MAX_SEND]
                };
                OUTBOX_LEN
            ]
            .into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }
}

impl Outbox {
    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `payload` (at most [`MAX_SEND`] bytes); false when full.
    pub fn push(&mut self, payload: &[u8]) -> bool {
        if self.len == self.items.len() || payload.len() > MAX_SEND {
            return false;
        }
        let i = (self.head + self.len) % self.items.len();
        let item = &mut self.items[i];
        item.bytes[..payload.len()].copy_from_slice(payload);
        item.len = payload.len() as u8;
        self.len += 1;
        true
    }
}

/// What a flush did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flushed {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams refused with a hard error and discarded.
    pub errors: u64,
    /// The socket's send buffer is full: wait until it is writable.
    pub blocked: bool,
}

/// Sends outboxes to the server with `sendmmsg`, through one set of headers.
pub struct Sender {
    dest: SockAddr,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

// SAFETY: `iovs` and `hdrs` hold raw pointers only during `flush`, into the
// outbox being flushed and `dest`, which outlive the call.
unsafe impl Send for Sender {}

impl Sender {
    /// A sender of datagrams to `dest`.
    pub fn new(dest: SockAddr) -> Sender {
        Sender {
            dest,
            iovs: vec![
                libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ]
            .into_boxed_slice(),
            // SAFETY: all-zero bytes are a valid mmsghdr.
            hdrs: vec![unsafe { zeroed::<libc::mmsghdr>() }; BATCH].into_boxed_slice(),
        }
    }

    /// Sends `outbox` from socket `fd` until it is empty or the socket is full.
    pub fn flush(&mut self, fd: RawFd, outbox: &mut Outbox) -> Flushed {
        let mut done = Flushed::default();
        while outbox.len > 0 {
            let n = outbox.len.min(BATCH);
            for k in 0..n {
                let i = (outbox.head + k) % outbox.items.len();
                let item = &mut outbox.items[i];
                self.iovs[k] = libc::iovec {
                    iov_base: item.bytes.as_mut_ptr().cast(),
                    iov_len: usize::from(item.len),
                };
                let h = &mut self.hdrs[k];
                // sendmmsg only reads the address, whatever the pointer's mutability.
                h.msg_hdr.msg_name = self.dest.as_ptr().cast_mut().cast();
                h.msg_hdr.msg_namelen = self.dest.len();
                h.msg_hdr.msg_iov = ptr::from_mut(&mut self.iovs[k]);
                h.msg_hdr.msg_iovlen = 1;
                h.msg_len = 0;
            }
            // SAFETY: the first n headers point at n live iovecs, which point
            // at items of the outbox, and at `self.dest`; all outlive the
            // call. sendmmsg reads them and writes only msg_len.
            let ret = syscall!(unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), n as _, 0) });
            let taken = match ret {
                Ok(sent) => {
                    done.sent += sent as u64;
                    sent as usize
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    done.blocked = true;
                    break;
                }
                // The first datagram was refused outright: drop it, go on.
                Err(_) => {
                    done.errors += 1;
                    1
                }
            };
            outbox.head = (outbox.head + taken) % outbox.items.len();
            outbox.len -= taken;
        }
        done
    }
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
    use psync::sys::RecvBatch;
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
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sender = Sender::new(rx.local_addr().unwrap().into());
        let mut outbox = Outbox::default();
        for k in 0..100u8 {
            assert!(outbox.push(&[k; 8]));
        }
        assert!(outbox.push(&[9; MAX_SEND]));
        assert!(!outbox.push(&[0; MAX_SEND + 1]));
        let done = sender.flush(tx.as_raw_fd(), &mut outbox);
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
