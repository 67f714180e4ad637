//! Linux: `recvmmsg` and `sendmmsg` over preallocated message arrays.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::ptr;

use mio::net::UdpSocket;

use super::{Datagram, Flushed, RECV_BUF_LEN, SEND_SLOT_LEN};

/// Received datagrams of one `recvmmsg` call, in buffers allocated once.
pub struct RecvBatch {
    /// `batch` buffers of `buf_len` bytes, end to end.
    bufs: Box<[u8]>,
    buf_len: usize,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    count: usize,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` point only into the heap
// allocations of `bufs`, `addrs` and `iovs`, which this value owns and which
// move with it; nothing is shared with another thread.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Room for `batch` datagrams per call, keeping [`RECV_BUF_LEN`] bytes
    /// of each (enough to judge a request).
    pub fn new(batch: usize) -> RecvBatch {
        RecvBatch::with_buf_len(batch, RECV_BUF_LEN)
    }

    /// Room for `batch` datagrams per call, keeping `buf_len` bytes of each
    /// (a client reading 20- or 32-byte replies needs more than a server).
    pub fn with_buf_len(batch: usize, buf_len: usize) -> RecvBatch {
        let batch = batch.max(1);
        let buf_len = buf_len.max(1);
        let mut bufs = vec![0u8; batch * buf_len].into_boxed_slice();
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for
        // which all-zero bytes are a valid value.
        let mut addrs =
            vec![unsafe { zeroed::<libc::sockaddr_storage>() }; batch].into_boxed_slice();
        let mut iovs: Box<[libc::iovec]> = bufs
            .chunks_exact_mut(buf_len)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: buf_len,
            })
            .collect();
        // SAFETY: as above.
        let mut hdrs = vec![unsafe { zeroed::<libc::mmsghdr>() }; batch].into_boxed_slice();
        for ((h, iov), addr) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(addrs.iter_mut()) {
            h.msg_hdr.msg_name = ptr::from_mut(addr).cast();
            h.msg_hdr.msg_iov = ptr::from_mut(iov);
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        RecvBatch {
            bufs,
            buf_len,
            addrs,
            iovs,
            hdrs,
            count: 0,
        }
    }

    /// Receives up to a batch of datagrams; `Err(WouldBlock)` when none is queued.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        // The kernel writes back a header's address length, flags and
        // length only for the datagrams it returns (a failed call writes
        // none): only the last call's headers need resetting, not the whole
        // batch's, which costs a small batch more than its datagrams do.
        for h in &mut self.hdrs[..self.count] {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        self.count = 0;
        debug_assert_eq!(self.iovs.len(), self.hdrs.len());
        loop {
            // SAFETY: every header points at a live buffer of buf_len bytes
            // and a sockaddr_storage, all owned by self, and the count passed is
            // the header array's length. MSG_TRUNC makes msg_len the datagram's
            // real length, so oversized datagrams are seen as such.
            let ret = syscall!(unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
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

    /// The kept bytes of the `i`th datagram of the last `recv` (empty past
    /// the batch): [`RecvBatch::get`]'s `data` without parsing the address,
    /// for a second pass over a batch whose sources the first one kept.
    pub fn data(&self, i: usize) -> &[u8] {
        if i >= self.count {
            return &[];
        }
        let len = (self.hdrs[i].msg_len as usize).min(self.buf_len);
        let start = i * self.buf_len;
        &self.bufs[start..start + len]
    }

    /// The `i`th datagram of the last `recv`, or `None` for an address the
    /// kernel gave in a family other than IPv4 or IPv6.
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.count {
            return None;
        }
        let len = self.hdrs[i].msg_len as usize;
        let from = from_storage(&self.addrs[i])?;
        let start = i * self.buf_len;
        Some(Datagram {
            data: &self.bufs[start..start + len.min(self.buf_len)],
            len,
            from,
        })
    }
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // is smaller than and aligned no stricter than sockaddr_storage.
            let a = unsafe { &*ptr::from_ref(ss).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*ptr::from_ref(ss).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                u32::from_be(a.sin6_flowinfo),
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A destination in the form the kernel takes.
#[derive(Clone, Copy)]
#[repr(C)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

#[derive(Clone, Copy)]
struct Item {
    addr: RawAddr,
    addr_len: libc::socklen_t,
    len: usize,
    bytes: [u8; SEND_SLOT_LEN],
}

/// A bounded FIFO of replies, flushed with `sendmmsg`.
pub struct SendQueue {
    items: Box<[Item]>,
    head: usize,
    len: usize,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

// SAFETY: `iovs` and `hdrs` hold pointers only while `flush` runs, into
// `items`, which this value owns.
unsafe impl Send for SendQueue {}

impl SendQueue {
    /// A queue of `capacity` replies, sent `batch` per system call.
    pub fn new(capacity: usize, batch: usize) -> SendQueue {
        let blank = Item {
            addr: RawAddr {
                // SAFETY: all-zero bytes are a valid sockaddr_in6.
                v6: unsafe { zeroed() },
            },
            addr_len: 0,
            len: 0,
            bytes: [0; SEND_SLOT_LEN],
        };
        let batch = batch.max(1);
        SendQueue {
            items: vec![blank; capacity.max(1)].into_boxed_slice(),
            head: 0,
            len: 0,
            iovs: vec![
                libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ]
            .into_boxed_slice(),
            // SAFETY: all-zero bytes are a valid mmsghdr.
            hdrs: vec![unsafe { zeroed::<libc::mmsghdr>() }; batch].into_boxed_slice(),
        }
    }

    /// Replies queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.items.len() - self.len
    }

    /// Queues `payload` for `to`; false (and nothing queued) when full.
    pub fn push(&mut self, to: SocketAddr, payload: &[u8]) -> bool {
        if payload.len() > SEND_SLOT_LEN {
            return false;
        }
        self.push_with(to, |slot| {
            slot[..payload.len()].copy_from_slice(payload);
            payload.len()
        })
    }

    /// Queues for `to` the datagram `emit` writes into the queue's own slot
    /// (returning its length), so that an encoder needs no buffer of its
    /// own and nothing is copied (for a 20-byte reply, the copy was a
    /// `memcpy` call); false (and `emit` not called) when full.
    #[inline]
    pub fn push_with(
        &mut self,
        to: SocketAddr,
        emit: impl FnOnce(&mut [u8; SEND_SLOT_LEN]) -> usize,
    ) -> bool {
        if self.len == self.items.len() {
            return false;
        }
        let mut i = self.head + self.len;
        if i >= self.items.len() {
            i -= self.items.len();
        }
        let item = &mut self.items[i];
        match to {
            SocketAddr::V4(a) => {
                item.addr.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                item.addr_len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                item.addr.v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                item.addr_len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        // Never past the slot, whatever `emit` says: `flush` hands the
        // kernel this many bytes of it.
        item.len = emit(&mut item.bytes).min(SEND_SLOT_LEN);
        self.len += 1;
        true
    }

    /// Sends queued replies until the queue is empty or the socket is full.
    /// A reply the kernel refuses with a hard error is counted and dropped.
    pub fn flush(&mut self, socket: &UdpSocket) -> Flushed {
        let mut done = Flushed::default();
        while self.len > 0 {
            let n = self.len.min(self.hdrs.len());
            for k in 0..n {
                let mut i = self.head + k;
                if i >= self.items.len() {
                    i -= self.items.len();
                }
                let item = &mut self.items[i];
                self.iovs[k] = libc::iovec {
                    iov_base: item.bytes.as_mut_ptr().cast(),
                    iov_len: item.len,
                };
                let h = &mut self.hdrs[k];
                h.msg_hdr.msg_name = ptr::from_mut(&mut item.addr).cast();
                h.msg_hdr.msg_namelen = item.addr_len;
                h.msg_hdr.msg_iov = ptr::from_mut(&mut self.iovs[k]);
                h.msg_hdr.msg_iovlen = 1;
                h.msg_len = 0;
            }
            // SAFETY: the first n headers point at live items and iovecs owned
            // by self, set just above; sendmmsg reads them and writes msg_len.
            let ret = syscall!(unsafe {
                libc::sendmmsg(socket.as_raw_fd(), self.hdrs.as_mut_ptr(), n as _, 0)
            });
            match ret {
                Ok(sent) => self.advance(sent as usize, &mut done.sent),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    done.blocked = true;
                    break;
                }
                // The first message failed (unreachable, refused by a
                // firewall, …): drop that one and go on with the rest.
                Err(_) => self.advance(1, &mut done.errors),
            }
        }
        done
    }

    fn advance(&mut self, n: usize, counter: &mut u64) {
        let n = n.min(self.len);
        self.head = (self.head + n) % self.items.len();
        self.len -= n;
        *counter += n as u64;
    }
}
