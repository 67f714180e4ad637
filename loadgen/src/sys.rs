//! The operating-system layer, and the only `unsafe` in the load generator:
//! `sendmmsg`/`recvmmsg` over preallocated arrays, a `timerfd` for waits
//! shorter than the millisecond `epoll_wait` offers, and `getrusage`.
//!
//! Linux only: the load generator exists to push a Linux server hard, and
//! these calls are what make that cheap.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
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

/// Receives batches with `recvmmsg` into buffers allocated once.
pub struct Receiver {
    bufs: Box<[[u8; RECV_LEN]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    count: usize,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point into the heap blocks
// of `bufs`, `addrs` and `iovs`, which this value owns and which move with it.
unsafe impl Send for Receiver {}

impl Default for Receiver {
    fn default() -> Self {
        let mut bufs = vec![[0u8; RECV_LEN]; BATCH].into_boxed_slice();
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut addrs =
            vec![unsafe { zeroed::<libc::sockaddr_storage>() }; BATCH].into_boxed_slice();
        let mut iovs: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: RECV_LEN,
            })
            .collect();
        // SAFETY: all-zero bytes are a valid mmsghdr.
        let mut hdrs = vec![unsafe { zeroed::<libc::mmsghdr>() }; BATCH].into_boxed_slice();
        for ((h, iov), addr) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(addrs.iter_mut()) {
            h.msg_hdr.msg_name = ptr::from_mut(addr).cast();
            h.msg_hdr.msg_iov = ptr::from_mut(iov);
            h.msg_hdr.msg_iovlen = 1;
        }
        Receiver {
            bufs,
            addrs,
            iovs,
            hdrs,
            count: 0,
        }
    }
}

impl Receiver {
    /// Receives up to [`BATCH`] datagrams from `fd`; `Err(WouldBlock)` when
    /// none is queued. Fewer than a batch means the queue is now empty.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.count = 0;
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        debug_assert_eq!(self.iovs.len(), self.hdrs.len());
        loop {
            // SAFETY: every header points at a live RECV_LEN buffer and a
            // sockaddr_storage owned by self, and the count is the header
            // array's length. MSG_TRUNC makes msg_len the real length.
            let ret = syscall!(unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as _,
                    libc::MSG_TRUNC as _,
                    ptr::null_mut(),
                )
            });
            match ret {
                Ok(n) => {
                    self.count = n as usize;
                    return Ok(self.count);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Datagram `i` of the last batch: its first bytes (at most
    /// [`RECV_LEN`]), its real length, and the sender's port (`None` for a
    /// sender that is not IPv4 or IPv6).
    pub fn get(&self, i: usize) -> (&[u8], usize, Option<u16>) {
        let len = self.hdrs[i].msg_len as usize;
        let ss = &self.addrs[i];
        let port = match i32::from(ss.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in,
                // which is smaller and no more aligned than sockaddr_storage.
                let a = unsafe { &*ptr::from_ref(ss).cast::<libc::sockaddr_in>() };
                Some(u16::from_be(a.sin_port))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let a = unsafe { &*ptr::from_ref(ss).cast::<libc::sockaddr_in6>() };
                Some(u16::from_be(a.sin6_port))
            }
            _ => None,
        };
        (&self.bufs[i][..len.min(RECV_LEN)], len, port)
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
    use std::net::UdpSocket;

    #[test]
    fn sends_and_receives_batches_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
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

        let mut recv = Receiver::default();
        let mut got = Vec::new();
        let tx_port = tx.local_addr().unwrap().port();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 101 && std::time::Instant::now() < deadline {
            match recv.recv(rx.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, len, port) = recv.get(i);
                        assert_eq!(port, Some(tx_port));
                        assert_eq!(data.len(), len);
                        got.push(data.to_vec());
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
            recv.recv(rx.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn an_oversized_datagram_shows_its_real_length() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[1u8; 200], rx.local_addr().unwrap()).unwrap();
        let mut recv = Receiver::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match recv.recv(rx.as_raw_fd()) {
                Ok(1) => break,
                Ok(n) => panic!("{n} datagrams"),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (data, len, _) = recv.get(0);
        assert_eq!((data.len(), len), (RECV_LEN, 200));
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
