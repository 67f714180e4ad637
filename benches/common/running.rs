//! A psync server run inside the bench's process, on a thread of its own
//! name, so that `cpu.rs` can charge it the CPU time it uses.

use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use psync::{Counters, Server, ServerConfig, ShutdownHandle};

/// A server running on its own thread.
pub struct Running {
    /// Where it listens (its first bound address).
    pub addr: SocketAddr,
    handle: ShutdownHandle,
    thread: JoinHandle<io::Result<Counters>>,
}

impl Running {
    /// Binds a server for `cfg` and runs it on a thread named `name`,
    /// bound to CPU `cpu` if one is given (with the workers it starts).
    pub fn start(cfg: &ServerConfig, name: &str, cpu: Option<usize>) -> Running {
        let mut server = Server::bind(cfg).expect("server binds");
        let addr = server.local_addrs()[0];
        let handle = server.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    psync::sys::pin_current_thread(cpu).expect("pin the server thread");
                }
                server.run()
            })
            .expect("spawn server thread");
        Running {
            addr,
            handle,
            thread,
        }
    }

    /// Stops the server and returns its final counters.
    pub fn stop(self) -> Counters {
        self.handle.shutdown();
        self.thread
            .join()
            .expect("server thread")
            .expect("server ran")
    }
}
