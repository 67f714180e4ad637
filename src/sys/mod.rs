//! The operating-system layer: batched UDP I/O and socket setup.
//!
//! This is the only module allowed `unsafe`; the load generator uses its
//! [`RecvBatch`] too, so there is one batched receive path. It offers one API, [`RecvBatch`]
//! and [`SendQueue`], backed by `recvmmsg`/`sendmmsg` on Linux
//! (`sys/linux.rs`) and by plain `recv_from`/`send_to` elsewhere
//! (`sys/fallback.rs`; the `portable-io` feature selects it on Linux too, so
//! CI tests it). Buffers are allocated once, in `new`; `recv` and
//! `flush` never allocate. Errors are `io::Error`; `WouldBlock` means the
//! socket has nothing more (or no room) right now.
//!
//! Besides the sockets: a `timerfd` ([`Timer`]) for waits shorter than the
//! millisecond `epoll_wait` offers, and CPU time from `getrusage`
//! ([`cpu_time`], [`thread_cpu_time`]), which the load generator needs.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Turns a `-1` return into the `errno` error: the one copy of this macro in
/// the workspace (the load generator uses this module too).
#[cfg(unix)]
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

#[cfg(all(target_os = "linux", not(feature = "portable-io")))]
#[path = "linux.rs"]
mod imp;

#[cfg(any(not(target_os = "linux"), feature = "portable-io"))]
#[path = "fallback.rs"]
mod imp;

pub use imp::{RecvBatch, SendQueue};

/// Bytes a server keeps of each received datagram: the longest message it
/// must read whole. A seed request is 8 bytes; a STUN Binding request is 20
/// to 28 bytes from psync's client, and about 100 from an ICE stack that adds
/// SOFTWARE, PRIORITY and ICE attributes; protocol v2 requests will be about
/// 100 to 200 bytes. 512 holds all of them with room. Anything longer is
/// invalid in every format, and the real length (`Datagram::len`, from
/// `MSG_TRUNC`) shows it. (The fallback reads at most the buffer, so a longer
/// datagram shows as exactly this length: still invalid.) recvmmsg copies
/// only what arrived, so a larger buffer costs memory (batch x 512 bytes per
/// socket), not time per datagram.
pub const RECV_BUF_LEN: usize = 512;

/// Bytes of one queued reply in a [`SendQueue`]: the longest datagram the
/// server sends, a protocol v2 reply (152 bytes, never longer than its
/// request; cookie replies are 40, STUN answers at most 52, seed replies 20
/// or 32). The queue copies only a reply's own bytes, so the slot's size
/// costs memory (queue length x 152 bytes), not time.
pub const SEND_SLOT_LEN: usize = crate::wire::v2::MAX_LEN;

const _: () = assert!(crate::wire::MAX_REPLY_LEN <= SEND_SLOT_LEN);
const _: () = assert!(crate::wire::stun::MAX_ANSWER_LEN <= SEND_SLOT_LEN);
const _: () = assert!(crate::wire::v2::REPLY_LEN <= SEND_SLOT_LEN);
const _: () = assert!(crate::wire::v2::COOKIE_REPLY_LEN <= SEND_SLOT_LEN);
// The receive buffer holds a whole v2 request and more, so a longer
// datagram cut to 152 bytes is never taken for one (its real length shows).
const _: () = assert!(crate::wire::v2::MAX_LEN < RECV_BUF_LEN);

/// One datagram of a received batch.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    /// The first bytes of the payload, at most the batch's buffer length.
    pub data: &'a [u8],
    /// The datagram's real length, which may exceed `data.len()` (with the
    /// fallback, it is capped at the buffer length).
    pub len: usize,
    /// Where it came from.
    pub from: SocketAddr,
}

/// What one `SendQueue::flush` achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Messages the kernel took.
    pub sent: u64,
    /// Messages refused with a hard error and discarded.
    pub errors: u64,
    /// True when the socket stopped taking messages (`EAGAIN`); the rest stay queued.
    pub blocked: bool,
}

/// Socket buffer sizes asked for, and what the kernel granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    /// SO_RCVBUF requested.
    pub rcv_wanted: usize,
    /// SO_RCVBUF granted (Linux reports twice the usable size; this is halved back).
    pub rcv_got: usize,
    /// SO_SNDBUF requested.
    pub snd_wanted: usize,
    /// SO_SNDBUF granted.
    pub snd_got: usize,
}

/// Opens a nonblocking UDP socket bound to `addr`, IPv6 sockets v6-only,
/// with the given buffer sizes (0 keeps the kernel default).
pub fn bind_udp(
    addr: SocketAddr,
    rcvbuf: usize,
    sndbuf: usize,
) -> io::Result<(std::net::UdpSocket, Buffers)> {
    open_udp(addr, rcvbuf, sndbuf, false)
}

fn open_udp(
    addr: SocketAddr,
    rcvbuf: usize,
    sndbuf: usize,
    reuse_port: bool,
) -> io::Result<(std::net::UdpSocket, Buffers)> {
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.set_nonblocking(true)?;
    let mut buffers = Buffers {
        rcv_wanted: rcvbuf,
        rcv_got: 0,
        snd_wanted: sndbuf,
        snd_got: 0,
    };
    if rcvbuf > 0 {
        socket.set_recv_buffer_size(rcvbuf)?;
    }
    if sndbuf > 0 {
        socket.set_send_buffer_size(sndbuf)?;
    }
    // Linux doubles the value for bookkeeping overhead and reports the double.
    let halve = if cfg!(target_os = "linux") { 2 } else { 1 };
    buffers.rcv_got = socket.recv_buffer_size()? / halve;
    buffers.snd_got = socket.send_buffer_size()? / halve;
    socket.bind(&addr.into())?;
    Ok((socket.into(), buffers))
}

/// One classic BPF instruction, as `struct sock_filter` holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BpfInsn {
    /// Opcode.
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// The constant operand.
    pub k: u32,
}

/// Opens `n` nonblocking UDP sockets bound together to `addr` (IPv6 ones
/// v6-only) with the given buffer sizes: one `SO_REUSEPORT` group, in which
/// socket `i` is the group's index `i`. With `n` = 1 the socket is bound
/// without `SO_REUSEPORT`, as a lone server always was. With a fixed port,
/// a socket already bound there (another server) makes this fail with
/// `AddrInUse` before the group forms, even if that socket would let the
/// group join it.
#[cfg(unix)]
pub fn bind_udp_group(
    addr: SocketAddr,
    n: usize,
    rcvbuf: usize,
    sndbuf: usize,
) -> io::Result<Vec<(std::net::UdpSocket, Buffers)>> {
    if n <= 1 {
        return Ok(vec![bind_udp(addr, rcvbuf, sndbuf)?]);
    }
    if addr.port() != 0 {
        // A plain bind fails where anyone holds the port; dropped at once.
        bind_udp(addr, 0, 0)?;
    }
    let mut group: Vec<(std::net::UdpSocket, Buffers)> = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let socket = open_udp(at, rcvbuf, sndbuf, true)?;
        at = socket.0.local_addr()?;
        group.push(socket);
    }
    Ok(group)
}

/// Attaches a classic BPF program to the `SO_REUSEPORT` group `socket`
/// belongs to (`SO_ATTACH_REUSEPORT_CBPF`): the kernel runs it on every
/// datagram for the group, with the UDP payload at offset 0, and delivers
/// the datagram to the group's socket of the index it returns (an index
/// beyond the group falls back to the kernel's hash).
#[cfg(target_os = "linux")]
pub fn attach_reuseport_cbpf(
    socket: &impl std::os::fd::AsRawFd,
    program: &[BpfInsn],
) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, `len` instructions that live until
    // the call returns; the kernel copies the program and keeps no pointer.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the CPU to bring the cache line at `p` into cache, for a read soon.
/// A hint: it never faults, whatever `p` is, and does nothing on targets
/// without a stable prefetch instruction.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is an SSE instruction, which every x86_64 CPU has;
    // it reads no memory architecturally and cannot fault, for any address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Milliseconds on the monotonic clock (`CLOCK_MONOTONIC`, which
/// `Instant` reads on Linux) from an arbitrary origin: one clock read and
/// integer arithmetic, for a loop that counts in milliseconds (`Instant`
/// adds a `Timespec` subtraction and a 128-bit division to each reading).
/// Never goes back.
#[cfg(unix)]
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec the call writes; CLOCK_MONOTONIC
    // exists on every unix this builds for, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// Milliseconds on the monotonic clock from an arbitrary origin (the first
/// call).
#[cfg(not(unix))]
pub fn monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// `n` zero bytes from the allocator's zeroed path, or `None` if it refuses.
/// Large blocks come straight from the OS as zero pages, so they cost
/// address space at once and resident memory only as they are written.
pub fn try_zeroed_bytes(n: usize) -> Option<Box<[u8]>> {
    if n == 0 {
        return Some(Box::new([]));
    }
    let layout = std::alloc::Layout::array::<u8>(n).ok()?;
    // SAFETY: `layout` has a non-zero size, as `alloc_zeroed` requires.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a live allocation of `n` zeroed bytes from the global
    // allocator with `Layout::array::<u8>(n)`, which is the layout a
    // `Box<[u8]>` of length `n` frees with; nothing else owns it.
    Some(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) })
}

/// `SK_MEMINFO_DROPS` (linux/sock_diag.h): the index of the drop count in
/// the array `SO_MEMINFO` returns.
#[cfg(target_os = "linux")]
const SK_MEMINFO_DROPS: usize = 8;

/// Datagrams the kernel dropped for this socket since it was opened
/// (receive buffer full, mostly): `SO_MEMINFO`'s drop count on Linux. Cheap
/// enough for a stats tick, not for every datagram. 0 elsewhere.
pub fn socket_drops(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut info = [0u32; 16];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: `info` is a writable buffer of `len` bytes that outlives
        // the call; the kernel writes at most `len` bytes and updates `len`.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        if (len as usize) < (SK_MEMINFO_DROPS + 1) * 4 {
            return Ok(0);
        }
        Ok(u64::from(info[SK_MEMINFO_DROPS]))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        Ok(0)
    }
}

/// Asks the kernel to report ICMP errors (a port unreachable is "connection
/// refused") on an unconnected UDP socket, as the error of its next receive.
/// Without it, Linux reports them only on connected sockets. Turning it off
/// again also drops the error reports queued meanwhile, so they cannot
/// crowd the receive buffer. Returns `Ok(false)` where the option does not
/// exist (not Linux): the caller then learns of a dead port by silence.
#[cfg(unix)]
pub fn set_recv_errors<S: std::os::fd::AsRawFd>(
    socket: &S,
    ipv6: bool,
    on: bool,
) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        let (level, name) = if ipv6 {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        } else {
            (libc::IPPROTO_IP, libc::IP_RECVERR)
        };
        let value: libc::c_int = on.into();
        // SAFETY: `value` is a live c_int and the length passed is its size;
        // setsockopt reads nothing else, and a bad fd only returns an error.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, ipv6, on);
        Ok(false)
    }
}

/// A one-shot monotonic timer with nanosecond resolution, pollable by mio
/// (edge-triggered: every expiry after a re-arm is a new event). Linux only.
#[cfg(target_os = "linux")]
pub struct Timer {
    fd: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Timer> {
        use std::os::fd::FromRawFd;
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
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once, `after` from now (a zero duration fires at once).
    pub fn arm(&mut self, after: std::time::Duration) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // A zero it_value would disarm the timer: use the smallest non-zero.
        let after = after.max(std::time::Duration::from_nanos(1));
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
        syscall!(unsafe {
            libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        })?;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
impl std::os::fd::AsRawFd for Timer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(unix)]
fn rusage(who: libc::c_int) -> std::time::Duration {
    // SAFETY: all-zero bytes are a valid rusage, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` with a pointer to a live rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time (user + system) this process has used so far.
#[cfg(unix)]
pub fn cpu_time() -> std::time::Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time (user + system) the calling thread has used so far (Linux;
/// elsewhere the process's).
#[cfg(unix)]
pub fn thread_cpu_time() -> std::time::Duration {
    #[cfg(target_os = "linux")]
    return rusage(libc::RUSAGE_THREAD);
    #[cfg(not(target_os = "linux"))]
    return rusage(libc::RUSAGE_SELF);
}

/// Binds the calling thread (and the threads it starts from now on, which
/// inherit it) to CPU `cpu` (`sched_setaffinity`). For benches that measure
/// CPU per pair with the server on one core and its load on another: a
/// thread that migrates between cores pays cold caches each time, which
/// shows as noise. An error when the CPU is not this process's to use, or
/// off Linux.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `set` is a plain bitmask owned here (all zeroes is a valid
        // value); CPU_ZERO and CPU_SET write inside it (the check below
        // refuses an index beyond its size first), and sched_setaffinity
        // only reads `size_of_val(&set)` bytes of it. Pid 0 is the calling
        // thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let bits = 8 * std::mem::size_of_val(&set);
            if cpu >= bits {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CPU {cpu} is beyond the {bits} a cpu_set_t holds"),
                ));
            }
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// The CPUs the calling thread may run on, ascending (`Cpus_allowed_list`
/// in `/proc/thread-self/status`, e.g. `0-1` or `0,2-3`): what
/// [`pin_current_thread`] may be given. An error where there is no such
/// file (off Linux) or it cannot be read.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .and_then(parse_cpu_list)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no readable Cpus_allowed_list in /proc/thread-self/status",
            )
        })
}

/// A kernel CPU list (`0-3,8,10-11`), ascending; `None` if malformed.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let mut ends = part.split('-').map(|x| x.parse::<usize>().ok());
        match (ends.next(), ends.next(), ends.next()) {
            (Some(Some(a)), None, None) => cpus.push(a),
            (Some(Some(a)), Some(Some(b)), None) if a <= b => cpus.extend(a..=b),
            _ => return None,
        }
    }
    Some(cpus)
}

/// Asks the kernel to back `len` bytes at `p` with transparent huge pages
/// where it can (`madvise(MADV_HUGEPAGE)`), before they are first touched.
/// For the engine's big tables, which are probed at random: with 4 KiB pages
/// nearly every probe of a table larger than the TLB's reach also misses the
/// TLB and walks the page tables; with 2 MiB pages it does not. A hint: it
/// fails quietly (no THP support, or `never`), and does nothing off Linux.
pub fn advise_huge_pages(p: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        // Only whole pages inside the range: madvise needs an aligned start.
        const PAGE: usize = 4096;
        let start = (p as usize).div_ceil(PAGE) * PAGE;
        let end = (p as usize).saturating_add(len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside an allocation the caller owns;
            // MADV_HUGEPAGE changes no contents and no mapping, only how the
            // kernel backs the pages, and a failure is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, len);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    /// A nonblocking mio socket on loopback.
    fn mio_socket() -> mio::net::UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        mio::net::UdpSocket::from_std(s)
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-3,8"), Some(vec![0, 2, 3, 8]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        for bad in ["", "0-1-2", "3-1", "a", "0,,1", "1-"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn pins_only_the_calling_thread() {
        let allowed = || allowed_cpus().unwrap();
        let before = allowed();
        let pinned = std::thread::spawn(move || {
            let r = pin_current_thread(usize::MAX);
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
            // A CPU this process may use: the first one allowed.
            let first = allowed()[0];
            pin_current_thread(first).unwrap();
            let inherited = std::thread::spawn(allowed).join().unwrap();
            (first, allowed(), inherited)
        })
        .join()
        .unwrap();
        assert_eq!(pinned.1, vec![pinned.0]);
        assert_eq!(pinned.2, pinned.1, "a thread started later inherits it");
        assert_eq!(allowed(), before, "other threads keep theirs");
    }

    #[test]
    fn sends_and_receives_batches_over_loopback() {
        let rx = mio_socket();
        let tx = mio_socket();
        let to = rx.local_addr().unwrap();
        let mut outbox = SendQueue::new(256, 64);
        for k in 0..100u8 {
            assert!(outbox.push(to, &[k; 8]));
        }
        assert!(outbox.push(to, &[9; 32]));
        // Longer than a queue slot: refused, not truncated.
        assert!(!outbox.push(to, &[0; SEND_SLOT_LEN + 1]));
        // Written in place; a length past the slot is cut to the slot.
        assert!(outbox.push_with(to, |slot| {
            slot[..3].copy_from_slice(&[1, 2, 3]);
            3
        }));
        assert!(outbox.push_with(to, |slot| {
            slot.fill(4);
            SEND_SLOT_LEN + 100
        }));
        let done = outbox.flush(&tx);
        assert_eq!(done.sent, 103);
        assert!(outbox.is_empty());

        let mut recv = RecvBatch::with_buf_len(64, 256);
        let mut got = Vec::new();
        let tx_port = tx.local_addr().unwrap().port();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 103 && Instant::now() < deadline {
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
        assert_eq!(got.len(), 103);
        assert_eq!(got[7], vec![7u8; 8]);
        assert_eq!(got[100], vec![9u8; 32]);
        assert_eq!(got[101], vec![1, 2, 3]);
        assert_eq!(got[102], vec![4u8; SEND_SLOT_LEN]);
        assert_eq!(
            recv.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn the_send_queue_wraps_around_its_ring_in_order() {
        let rx = mio_socket();
        let tx = mio_socket();
        let to = rx.local_addr().unwrap();
        // 8 slots, 4 per call: the second round starts at slot 6, so its
        // replies run past the end of the ring. Each has its own length.
        let mut outbox = SendQueue::new(8, 4);
        for round in 0..2u8 {
            for k in 0..6u8 {
                let v = round * 6 + k;
                assert!(outbox.push(to, &vec![v; usize::from(v) + 1]));
            }
            assert_eq!(outbox.free(), 2);
            assert_eq!(outbox.flush(&tx).sent, 6);
            assert!(outbox.is_empty());
        }
        let mut recv = RecvBatch::with_buf_len(64, 64);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 12 && Instant::now() < deadline {
            match recv.recv(&rx) {
                Ok(n) => (0..n).for_each(|i| got.push(recv.get(i).unwrap().data.to_vec())),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let want: Vec<Vec<u8>> = (0..12u8).map(|v| vec![v; usize::from(v) + 1]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_oversized_datagram_shows_its_real_length() {
        let rx = mio_socket();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[1u8; 200], rx.local_addr().unwrap()).unwrap();
        let mut recv = RecvBatch::with_buf_len(64, 64);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match recv.recv(&rx) {
                Ok(1) => break,
                Ok(n) => panic!("{n} datagrams"),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        }
        let d = recv.get(0).expect("an IPv4 sender");
        // The fallback reads at most the buffer, so it cannot see the real length.
        let real = if cfg!(all(target_os = "linux", not(feature = "portable-io"))) {
            200
        } else {
            64
        };
        assert_eq!((d.data.len(), d.len), (64, real));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn timer_fires_and_cpu_time_counts() {
        use std::os::fd::AsRawFd;
        let mut t = Timer::new().unwrap();
        t.arm(Duration::from_micros(200)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let mut ticks = [0u8; 8];
        // SAFETY: a read of 8 bytes into a live buffer of 8 bytes.
        let n = unsafe { libc::read(t.as_raw_fd(), ticks.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(u64::from_ne_bytes(ticks), 1);
        // Burn a little CPU so that both clocks move.
        let mut x = 0u64;
        while thread_cpu_time() == Duration::ZERO {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time() >= thread_cpu_time());
    }
}
