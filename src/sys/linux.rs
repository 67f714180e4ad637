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

/// One slot of a [`SendQueue`]: the destination and the datagram; its
/// lengths live in the slot's header and iovec, which point here.
#[derive(Clone, Copy)]
struct Item {
    addr: RawAddr,
    bytes: [u8; SEND_SLOT_LEN],
}

/// A bounded FIFO of replies, flushed with `sendmmsg`.
///
/// Every slot has its own `mmsghdr` and `iovec`, pointing at the slot from
/// the start: a push writes the destination, the bytes and the two
/// lengths, and a flush hands the kernel the headers of the queued slots
/// as they lie (up to the end of the ring, then from its start), with
/// nothing to set up per message.
pub struct SendQueue {
    items: Box<[Item]>,
    head: usize,
    len: usize,
    batch: usize,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` point only into the
// heap allocations of `items` and `iovs`, which this value owns and which
// move with it; nothing is shared with another thread.
unsafe impl Send for SendQueue {}

impl SendQueue {
    /// A queue of `capacity` replies, sent `batch` per system call.
    pub fn new(capacity: usize, batch: usize) -> SendQueue {
        let blank = Item {
            addr: RawAddr {
                // SAFETY: all-zero bytes are a valid sockaddr_in6.
                v6: unsafe { zeroed() },
            },
            bytes: [0; SEND_SLOT_LEN],
        };
        let capacity = capacity.max(1);
        let mut items = vec![blank; capacity].into_boxed_slice();
        let mut iovs: Box<[libc::iovec]> = items
            .iter_mut()
            .map(|item| libc::iovec {
                iov_base: item.bytes.as_mut_ptr().cast(),
                iov_len: 0,
            })
            .collect();
        // SAFETY: all-zero bytes are a valid mmsghdr.
        let mut hdrs = vec![unsafe { zeroed::<libc::mmsghdr>() }; capacity].into_boxed_slice();
        for ((h, iov), item) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(items.iter_mut()) {
            h.msg_hdr.msg_name = ptr::from_mut(&mut item.addr).cast();
            h.msg_hdr.msg_iov = ptr::from_mut(iov);
            h.msg_hdr.msg_iovlen = 1;
        }
        SendQueue {
            items,
            head: 0,
            len: 0,
            batch: batch.max(1),
            iovs,
            hdrs,
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
        let addr_len = match to {
            SocketAddr::V4(a) => {
                item.addr.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                size_of::<libc::sockaddr_in>()
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
                size_of::<libc::sockaddr_in6>()
            }
        };
        // Never past the slot, whatever `emit` says: `flush` hands the
        // kernel this many bytes of it.
        self.iovs[i].iov_len = emit(&mut item.bytes).min(SEND_SLOT_LEN);
        self.hdrs[i].msg_hdr.msg_namelen = addr_len as libc::socklen_t;
        self.len += 1;
        true
    }

    /// Sends queued replies until the queue is empty or the socket is full.
    /// A reply the kernel refuses with a hard error is counted and dropped.
    pub fn flush(&mut self, socket: &UdpSocket) -> Flushed {
        let mut done = Flushed::default();
        while self.len > 0 {
            // The queued slots from the head, up to a batch and to the end
            // of the ring (what is past it goes in the next call).
            let n = self.len.min(self.batch).min(self.items.len() - self.head);
            let first = &mut self.hdrs[self.head..self.head + n];
            // SAFETY: these n headers point at their slots' addresses and
            // iovecs, and the iovecs at their slots' bytes, all owned by
            // self (set in `new`, lengths set by `push_with`); sendmmsg
            // reads them and writes only msg_len.
            let ret = syscall!(unsafe {
                libc::sendmmsg(socket.as_raw_fd(), first.as_mut_ptr(), n as _, 0)
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
