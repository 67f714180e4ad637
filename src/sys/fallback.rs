//! Portable fallback: one `recv_from` or `send_to` per datagram, same API.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;

use super::{Datagram, Flushed, RECV_BUF_LEN, SEND_SLOT_LEN};

/// Received datagrams, read one system call each.
pub struct RecvBatch {
    /// `batch` buffers of `buf_len` bytes, end to end.
    bufs: Box<[u8]>,
    buf_len: usize,
    meta: Box<[(usize, SocketAddr)]>,
    count: usize,
}

impl RecvBatch {
    /// Room for `batch` datagrams per call, keeping [`RECV_BUF_LEN`] bytes of each.
    pub fn new(batch: usize) -> RecvBatch {
        RecvBatch::with_buf_len(batch, RECV_BUF_LEN)
    }

    /// Room for `batch` datagrams per call, keeping `buf_len` bytes of each.
    pub fn with_buf_len(batch: usize, buf_len: usize) -> RecvBatch {
        let batch = batch.max(1);
        let buf_len = buf_len.max(1);
        RecvBatch {
            bufs: vec![0u8; batch * buf_len].into_boxed_slice(),
            buf_len,
            meta: vec![(0, SocketAddr::from(([0, 0, 0, 0], 0))); batch].into_boxed_slice(),
            count: 0,
        }
    }

    /// Receives up to a batch; `Err(WouldBlock)` when none is queued.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.count = 0;
        while self.count < self.meta.len() {
            let start = self.count * self.buf_len;
            match socket.recv_from(&mut self.bufs[start..start + self.buf_len]) {
                // A longer datagram is cut to the buffer: its length then
                // reads as the buffer's, which is invalid all the same.
                Ok((n, from)) => {
                    self.meta[self.count] = (n, from);
                    self.count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.count > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.count)
    }

    /// The kept bytes of the `i`th datagram of the last `recv` (empty past
    /// the batch): [`RecvBatch::get`]'s `data` alone.
    pub fn data(&self, i: usize) -> &[u8] {
        if i >= self.count {
            return &[];
        }
        let len = self.meta[i].0.min(self.buf_len);
        let start = i * self.buf_len;
        &self.bufs[start..start + len]
    }

    /// The `i`th datagram of the last `recv`.
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.count {
            return None;
        }
        let (len, from) = self.meta[i];
        let start = i * self.buf_len;
        Some(Datagram {
            data: &self.bufs[start..start + len.min(self.buf_len)],
            len,
            from,
        })
    }
}

/// A bounded FIFO of replies, sent one `send_to` each.
pub struct SendQueue {
    items: VecDeque<(SocketAddr, usize, [u8; SEND_SLOT_LEN])>,
    capacity: usize,
}

impl SendQueue {
    /// A queue of `capacity` replies.
    pub fn new(capacity: usize, _batch: usize) -> SendQueue {
        SendQueue {
            items: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
        }
    }

    /// Replies queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.capacity - self.items.len()
    }

    /// Queues `payload` for `to`; false when full.
    pub fn push(&mut self, to: SocketAddr, payload: &[u8]) -> bool {
        if self.items.len() == self.capacity || payload.len() > SEND_SLOT_LEN {
            return false;
        }
        let mut bytes = [0u8; SEND_SLOT_LEN];
        bytes[..payload.len()].copy_from_slice(payload);
        self.items.push_back((to, payload.len(), bytes));
        true
    }

    /// Queues for `to` the datagram `emit` writes (returning its length);
    /// false (and `emit` not called) when full.
    pub fn push_with(
        &mut self,
        to: SocketAddr,
        emit: impl FnOnce(&mut [u8; SEND_SLOT_LEN]) -> usize,
    ) -> bool {
        if self.items.len() == self.capacity {
            return false;
        }
        let mut bytes = [0u8; SEND_SLOT_LEN];
        let len = emit(&mut bytes).min(SEND_SLOT_LEN);
        self.items.push_back((to, len, bytes));
        true
    }

    /// Sends until empty or the socket is full; hard errors drop that reply.
    pub fn flush(&mut self, socket: &UdpSocket) -> Flushed {
        let mut done = Flushed::default();
        while let Some((to, len, bytes)) = self.items.front() {
            match socket.send_to(&bytes[..*len], *to) {
                Ok(_) => done.sent += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    done.blocked = true;
                    break;
                }
                Err(_) => done.errors += 1,
            }
            self.items.pop_front();
        }
        done
    }
}
